"""Project hygiene: the setup files agree with each other, and notebooks are committed clean and paired with jupytext.

These run in seconds and catch the drift that otherwise only shows up on someone else's machine.
"""

from __future__ import annotations

import ast
import difflib
import os
import re
from pathlib import Path

import jupytext
import nbformat
import pytest
import yaml
from conftest import TWIN_FORMAT, notebook_twin
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _requirements(specs: list[str]) -> dict[str, str]:
    """name -> normalised specifier, so "torch >=2.9" and "torch>=2.9" compare equal but "torch>=2.8" does not."""
    out = {}
    for spec in specs:
        req = Requirement(spec)
        name = canonicalize_name(req.name) + (f"[{','.join(sorted(req.extras))}]" if req.extras else "")
        assert name not in out, f"{name} listed twice"
        out[name] = ",".join(sorted(str(s) for s in req.specifier))
    return out


def test_environment_yml_matches_pyproject():
    """Conda users must get the same packages as ./dev; the two lists are edited by hand, so check them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    want = _requirements(project["dependencies"] + project["optional-dependencies"]["test"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] == "gemma4lab"
    assert "python=3.11" in env["dependencies"]
    pip = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip) == 1, "environment.yml needs exactly one pip: section"
    got = _requirements([line for line in pip[0] if not line.startswith("-")])  # "-e ." is an option, not a package
    assert got == want, (
        f"environment.yml and pyproject.toml disagree:\n  only in pyproject: {sorted(want.items() - got.items())}"
        f"\n  only in environment.yml: {sorted(got.items() - want.items())}"
    )


def test_ci_runs_dev_test():
    """CI must run exactly what developers run, or a green CI means nothing locally."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in ci
    assert re.search(r"^\s*(exec\s+)?\./dev test\s*$", ci, re.M), ".ci/run must call ./dev test"
    assert os.access(ROOT / "dev", os.X_OK), "./dev must be executable (git update-index --chmod=+x dev)"
    dev = (ROOT / "dev").read_text()
    assert "torch==" in dev, "./dev must pin torch: a bare requirement can pull a multi-GB CUDA build"


def test_executed_notebooks_are_gitignored():
    """./dev notebooks writes executed copies to executed/; they must never be committed."""
    assert "/executed/" in (ROOT / ".gitignore").read_text().split()


def test_readme_names_the_two_commands():
    """The README promises two commands; make sure it still names both."""
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md not written yet")
    text = readme.read_text()
    for cmd in ("./dev notebooks", "./dev test"):
        assert cmd in text, f"README.md should mention `{cmd}`"


def _assigned_names(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_hygiene(path: Path):
    """Committed notebooks carry no outputs, run on the default kernel, and take papermill's CPU parameters."""
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", "kernelspec name must be python3"
    assert nb.cells and nb.cells[0].cell_type == "markdown", "first cell must be markdown"
    assert nb.cells[0].source.lstrip().startswith("# "), "first cell must start with a '# Title'"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.get("outputs"), f"cell {i} has outputs: clear them before committing"
            assert cell.get("execution_count") is None, f"cell {i} has an execution count: clear it"
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "exactly one cell must be tagged 'parameters' (papermill injects after it)"
    assert params[0].cell_type == "code"
    missing = {"INTERACTIVE", "DEVICE"} - _assigned_names(params[0].source)
    assert not missing, f"parameters cell must define {sorted(missing)}"


def _cells(nb) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(c.cell_type, c.source.strip(), tuple(c.get("metadata", {}).get("tags", []))) for c in nb.cells]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_paired_with_percent_script(path: Path):
    """The .py twin (in notebooks/py/) is what reviewers diff; it must say the same thing as the .ipynb
    (jupytext --sync)."""
    script = notebook_twin(path)
    assert script.exists(), f"missing py/{script.name}: run `jupytext --set-formats {TWIN_FORMAT} {path.name}`"
    assert jupytext.read(path).metadata.get("jupytext", {}).get("formats") == TWIN_FORMAT
    text = script.read_text()
    assert jupytext.formats.guess_format(text, ".py")[0] == "percent", f"{script.name} is not in percent format"
    ipynb, py = _cells(jupytext.read(path)), _cells(jupytext.reads(text, fmt="py:percent"))
    for i, (a, b) in enumerate(zip(ipynb, py)):
        assert a == b, f"cell {i} differs between {path.name} and {script.name}: run `jupytext --sync {path.name}`"
    assert len(ipynb) == len(py), f"{path.name} has {len(ipynb)} cells, {script.name} {len(py)}: run jupytext --sync"
    # JupyterLab's jupytext contents manager makes this very comparison (header included) and refuses to open the
    # notebook when it fails and the .ipynb is the newer file.
    from_ipynb = jupytext.writes(jupytext.read(path), "py:percent")
    from_py = jupytext.writes(jupytext.reads(text, fmt="py:percent"), "py:percent")
    diff = "\n".join(
        difflib.unified_diff(from_py.splitlines(), from_ipynb.splitlines(), script.name, path.name, lineterm="")
    )
    assert not diff, f"{script.name} is out of sync with {path.name} (run `jupytext --sync {path.name}`):\n{diff}"


def test_exercise_check_passes_and_fails_loudly(capsys):
    from gemma4lab.lab import notebook

    notebook.check(True, "two plus two is four")
    assert "✓ two plus two is four" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="not yet: expected the right bucket count"):
        notebook.check(False, "the right bucket count")
    with pytest.raises(TypeError, match="a bool"):
        notebook.check(3, "an int is not a verdict")
