"""Every numbered notebook runs top to bottom on CPU, exactly as `./dev notebooks` runs it.

Notebooks are the project's documentation; one that no longer runs is a broken doc, so each is a test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
PARAMETERS = {"INTERACTIVE": False, "DEVICE": "cpu"}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run with papermill in notebooks/ (relative paths as in JupyterLab); the executed copy goes to tmp_path."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    # The kernel inherits this process's environment: CPU tensors need the Triton interpreter, and figures should
    # use the notebook's own (inline) backend, not whatever a CI runner exported.
    if "TRITON_INTERPRET" not in os.environ:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)

    before = path.read_bytes()
    out = tmp_path / path.name
    error = None
    try:
        nb = papermill.execute_notebook(
            str(path),
            str(out),
            parameters=PARAMETERS,
            kernel_name="python3",
            cwd=str(NOTEBOOK_DIR),
            execution_timeout=600,
            progress_bar=False,
        )
    except PapermillExecutionError as e:  # its str() is the failing cell's traceback, colours stripped
        error = e
    if error is not None:  # failed outside the except block, so the traceback is shown once, not chained
        pytest.fail(f"{path.name} failed (executed copy: {out}):{error}", pytrace=False)

    assert dict(nb.metadata.papermill.parameters) == PARAMETERS
    assert path.read_bytes() == before, f"executing {path.name} modified the committed notebook"
