"""What the first cell of every notebook does: choose the Triton interpreter on CPU and find the checkout.

It must run before ``gemma4lab.kernels`` is imported (Triton reads ``TRITON_INTERPRET`` when the kernels are
decorated), so this module imports nothing heavy.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def setup(device: str, start: str | Path | None = None) -> Path:
    """Prepare a notebook kernel for ``device`` and return the repo root (the folder holding ``pyproject.toml``).

    On ``"cpu"`` it sets ``TRITON_INTERPRET=1`` (unless already set) so the Triton kernels run in the interpreter:
    call it before ``gemma4lab.kernels`` is imported, since Triton reads the variable when kernels are decorated.
    A typo such as ``"gpu"`` raises ValueError here rather than a confusing error many cells later.
    """
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise ValueError(f"unknown DEVICE {device!r}: use 'cpu' (Triton interpreter) or 'cuda' / 'cuda:N' (a GPU)")
    if device == "cpu":
        if "gemma4lab.kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            warnings.warn("gemma4lab.kernels was imported before setup('cpu'): restart the kernel and call "
                          "notebook_setup first, or the kernels will not run on CPU tensors", stacklevel=2)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    here = Path(start) if start is not None else Path.cwd()
    for p in (here, *here.parents):
        if (p / "pyproject.toml").exists():
            return p
    package_root = Path(__file__).resolve().parents[2]  # an installed checkout run from elsewhere
    if (package_root / "pyproject.toml").exists():
        return package_root
    raise FileNotFoundError(f"no pyproject.toml above {here}: start the notebook inside the gemma4lab checkout")


def check(ok: bool, what: str) -> None:
    """An exercise's self-check: prints a tick, or raises ``AssertionError`` saying what the answer should satisfy
    (so *Run All* and papermill stop at a wrong answer, and a stale solution fails CI)."""
    if type(ok).__name__ not in ("bool", "bool_"):  # Python, numpy 1 and numpy 2 bools
        raise TypeError(f"check() takes the result of a comparison (a bool), got {type(ok).__name__}")
    if not ok:
        raise AssertionError(f"not yet: expected {what}")
    print(f"✓ {what}")
