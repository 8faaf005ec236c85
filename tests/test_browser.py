"""End to end in a real browser: JupyterLab opens the interactive notebook, Run All works, and the slider redraws.

papermill proves the code runs; only a browser proves what a person sees: widgets render, figures appear, and a
slider actually drives the plot. Debian's Chromium is driven by Playwright (its own browser download can't work here).

Knobs: GEMMA4LAB_BROWSER_NOTEBOOK=/path/nb.ipynb tests that notebook instead (its folder is copied);
GEMMA4LAB_CHROMIUM (default /usr/bin/chromium); GEMMA4LAB_BROWSER_RUN_TIMEOUT seconds for Run All (default 300).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from conftest import notebook_twin

ROOT = Path(__file__).resolve().parents[1]
PREFERRED = "05_launch_overhead.ipynb"
CHROMIUM = Path(os.environ.get("GEMMA4LAB_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
RUN_TIMEOUT = float(os.environ.get("GEMMA4LAB_BROWSER_RUN_TIMEOUT", "300"))
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _has_slider(path: Path) -> bool:
    nb = nbformat.read(path, as_version=4)
    return any(c.cell_type == "code" and re.search(r"IntSlider|FloatSlider|\binteract\b", c.source) for c in nb.cells)


def _demo_notebook(folder: Path) -> Path:
    """Stand-in used while no repo notebook has a slider: the same wiring (inline figure redrawn by `interact`)."""
    cells = [
        nbformat.v4.new_markdown_cell("# Browser smoke test"),
        nbformat.v4.new_code_cell('INTERACTIVE = True\nDEVICE = "cpu"', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "%matplotlib inline\nimport matplotlib.pyplot as plt\nimport numpy as np\n"
            "from ipywidgets import IntSlider, interact\n\nx = np.linspace(0, 2 * np.pi, 200)\n"
            "plt.plot(x, np.sin(x))\nplt.show()"
        ),
        nbformat.v4.new_code_cell(
            "def draw(k):\n    fig, ax = plt.subplots(figsize=(4, 3))\n    ax.plot(x, np.sin(k * x))\n"
            '    ax.set_title(f"k = {k}")\n    plt.show()\n\n\n'
            "if INTERACTIVE:\n    interact(draw, k=IntSlider(value=1, min=1, max=10))"
        ),
    ]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    path = folder / "browser_demo.ipynb"
    nbformat.write(nb, path)
    return path


def _like_a_fresh_clone(folder: Path) -> None:
    """Give each .py twin its notebook's mtime, as a git checkout does (it writes both at once).

    A working tree where the .ipynb was saved last would otherwise make jupytext's contents manager refuse to open it
    whenever the pair differs at all (tests/test_project.py checks the pair itself).
    """
    for nb in folder.glob("*.ipynb"):
        if (twin := notebook_twin(nb)).exists():
            st = nb.stat()
            os.utime(twin, ns=(st.st_atime_ns, st.st_mtime_ns))


def _stage(tmp_path: Path) -> tuple[Path, str]:
    """Copy the notebooks into a scratch repo-shaped folder so running them in the lab can't touch the repo."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("pyproject.toml", "README.md"):  # notebooks may find the repo root by walking up to these
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, repo / name)
    (repo / "gemma4lab").symlink_to(ROOT / "gemma4lab")
    (repo / "results").mkdir()
    override = os.environ.get("GEMMA4LAB_BROWSER_NOTEBOOK")
    if override:
        source = Path(override).resolve()
        shutil.copytree(source.parent, repo / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        _like_a_fresh_clone(repo / "notebooks")
        return repo / "notebooks", source.name
    shutil.copytree(ROOT / "notebooks", repo / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    folder = repo / "notebooks"
    _like_a_fresh_clone(folder)
    if (folder / PREFERRED).exists():
        return folder, PREFERRED
    for path in sorted(folder.glob("[0-9][0-9]_*.ipynb")):
        if _has_slider(path):
            return folder, path.name
    warnings.warn(
        "no notebook in notebooks/ has an ipywidgets slider yet; testing a built-in demo notebook", stacklevel=1
    )
    return folder, _demo_notebook(folder).name


def _lab_settings(folder: Path) -> None:
    """No news/update toasts over the page, and every cell attached to the DOM (no windowing) so locators see all."""
    settings = {
        "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
        "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    }
    for name, value in settings.items():
        path = folder / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _jupyter_lab(root_dir: Path, tmp_path: Path) -> Iterator[str]:
    """A throwaway JupyterLab on a free port (safe under pytest-xdist), with isolated settings; killed afterwards."""
    port = _free_port()
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)  # the notebook's inline backend, not a CI runner's Agg
    try:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("TRITON_INTERPRET", "1")
    except ImportError:
        env.setdefault("TRITON_INTERPRET", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for var, sub in [
        ("JUPYTERLAB_SETTINGS_DIR", "settings"),
        ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTER_DATA_DIR", "data"),
    ]:
        env[var] = str(tmp_path / "jupyter" / sub)
        Path(env[var]).mkdir(parents=True, exist_ok=True)
    _lab_settings(Path(env["JUPYTERLAB_SETTINGS_DIR"]))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}",
           "--ServerApp.ip=127.0.0.1", "--ServerApp.port_retries=0", "--IdentityProvider.token=",
           "--ServerApp.disable_check_xsrf=True", "--LabApp.expose_app_in_browser=True",
           f"--ServerApp.root_dir={root_dir}"]  # fmt: skip
    log = tmp_path / "jupyterlab.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=root_dir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not answer within 90 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started share this process group
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        print(f"--- jupyter lab log (tail) ---\n{log.read_text()[-3000:]}")  # shown by pytest only on failure


# Notebook state read from JupyterLab's own models (exposed by --LabApp.expose_app_in_browser).
STATE_JS = """() => {
  const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.sessionContext || !panel.content || !panel.content.model) return null;
  const session = panel.sessionContext.session;
  const cells = panel.content.model.cells;
  const out = {status: session && session.kernel ? session.kernel.status : 'none', code: 0, executed: 0, errors: []};
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== 'code') continue;
    out.code++;
    if (cell.executionCount !== null) out.executed++;
    for (let j = 0; j < cell.outputs.length; j++) {
      const o = cell.outputs.get(j).toJSON();
      if (o.output_type === 'error') out.errors.push(`cell ${i}: ${o.ename}: ${o.evalue}`);
    }
  }
  return out;
}"""


def _wait(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _dismiss_toasts(page) -> None:
    for button in page.locator(".Toastify__close-button").all():
        with contextlib.suppress(Exception):
            button.click(timeout=1000)


def _image_srcs(scope) -> list[str]:
    return [img.get_attribute("src") or "" for img in scope.locator("img").all()]


def _drive_notebook(page, base: str, name: str) -> None:
    page.goto(f"{base}/lab/tree/{name}", wait_until="domcontentloaded")
    cell, dialog = page.locator(".jp-Notebook .jp-Cell").first, page.locator(".jp-Dialog")
    _wait(lambda: cell.is_visible() or dialog.count(), 60, "the notebook to open")
    assert not dialog.count(), f"JupyterLab showed a dialog instead of the notebook:\n{dialog.first.inner_text()}"
    _wait(lambda: (s := page.evaluate(STATE_JS)) and s["status"] == "idle", 90, "the kernel to start (idle)")
    _dismiss_toasts(page)

    # Run → Run All Cells, like a person.
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^\s*Run\s*$")).click()
    label = page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$"))
    page.locator(".lm-Menu-item", has=label).click()

    def finished():
        s = page.evaluate(STATE_JS)
        if not s or s["status"] != "idle" or page.locator(".jp-InputPrompt", has_text="[*]").count():
            return None
        return s if s["executed"] == s["code"] or s["errors"] else None

    _wait(finished, RUN_TIMEOUT, "Run All Cells to finish")
    time.sleep(1)
    state = _wait(finished, 10, "the kernel to stay idle")  # a second look: idle between two cells is not done
    _dismiss_toasts(page)

    assert not state["errors"], f"cells raised: {state['errors']}"
    tracebacks = [t for t in page.locator(".jp-OutputArea-output").all_inner_texts() if "Traceback" in t]
    assert not tracebacks, f"a traceback is shown on the page (e.g. inside a widget):\n{tracebacks[0][-2000:]}"
    assert state["executed"] == state["code"], f"only {state['executed']} of {state['code']} code cells ran"
    assert page.locator(".jp-RenderedImage img").count() >= 1, "no figure was rendered"

    # Move the first slider with the keyboard and check that the figure it drives is redrawn.
    handle = page.locator(".widget-slider .noUi-handle").first
    handle.wait_for(timeout=30_000)
    handle.scroll_into_view_if_needed()
    area = page.locator(".jp-Cell-outputArea", has=page.locator(".widget-slider")).first
    scope = area if area.locator("img").count() else page.locator(".jp-Notebook")
    _wait(lambda: _image_srcs(scope), 60, "the slider's figure to render")
    before, value = _image_srcs(scope), handle.get_attribute("aria-valuenow")
    key = "ArrowLeft" if value == handle.get_attribute("aria-valuemax") else "ArrowRight"
    handle.focus()
    for _ in range(3):
        handle.press(key)
        time.sleep(0.2)
    assert handle.get_attribute("aria-valuenow") != value, f"{key} did not move the slider from {value}"
    _wait(
        lambda: (after := _image_srcs(scope)) and after != before, 120, "the figure to change after moving the slider"
    )
    tracebacks = [t for t in page.locator(".jp-OutputArea-output").all_inner_texts() if "Traceback" in t]
    assert not tracebacks, f"moving the slider raised:\n{tracebacks[0][-2000:]}"


@pytest.mark.timeout(600)
def test_lab_run_all_and_slider(tmp_path: Path):
    """Open the notebook in JupyterLab, Run → Run All Cells, see a figure, move the slider, see it redraw."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = [what for what, ok in [("pip playwright", sync_playwright), (str(CHROMIUM), CHROMIUM.exists())] if not ok]
    if missing:
        msg = f"browser test needs {' and '.join(missing)}: ./dev test installs them"
        if IN_CI:
            pytest.fail(msg, pytrace=False)  # ./dev test installs both, so in CI this is a broken setup, not a skip
        pytest.skip(msg)

    root_dir, name = _stage(tmp_path)
    with _jupyter_lab(root_dir, tmp_path) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            try:
                _drive_notebook(page, base, name)
                page.screenshot(path=str(tmp_path / "browser-final.png"), full_page=True)  # to look at, if curious
            except BaseException:
                shot = tmp_path / "browser-failure.png"
                with contextlib.suppress(Exception):
                    page.screenshot(path=str(shot), full_page=True)
                    print(f"screenshot: {shot}")
                raise
        finally:
            browser.close()
