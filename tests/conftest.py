"""Shared test setup.

``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` function is decorated, so it is set here, before
gemma4lab is imported; on a machine with a GPU the tests that need one run on it, elsewhere they are skipped.
"""

from __future__ import annotations

import os

if not os.environ.get("GEMMA4LAB_NO_INTERPRET"):
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:  # pragma: no cover
        os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses

import pytest
import torch

from gemma4lab import Gemma4Config

#: Files whose module fixtures take minutes on 2 CPU cores: collected first, so that ``--dist loadfile`` starts them
#: before the many short files and the suite does not end waiting for one of them (``./dev test``: under 10 minutes).
LONG_FILES = ("test_bench_prefill.py", "test_bench_prefill_compile.py", "test_bench_prefill_vision.py",
              "test_hf_patch.py", "test_notebooks.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in LONG_FILES)  # stable: the order within each group is kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def random_vision_tower(vcfg, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A vision tower with random weights at the scales a trained one has (norm weights around 0.4, position
    embeddings of 0.5, matrices of unit output scale, a random standardisation bias): what the tower tests run."""
    from gemma4lab.model.vision import VisionTower

    torch.manual_seed(0)
    tower = VisionTower(vcfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.rand(p.shape, generator=g) * 0.4 + 0.2)
            elif "position_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        if vcfg.standardize:
            tower.std_bias.copy_(torch.randn(tower.std_bias.shape, generator=g))
    return tower.to(device=device, dtype=dtype).eval()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere fails."""
    out64, ref64 = out.double(), ref.double()
    if torch.isnan(out64).any():
        return float("inf")
    return ((out64 - ref64).norm() / ref64.norm()).item()


def with_fusion(model, fusion, fn):
    """``fn()`` with ``model.set_fusion(fusion)``, the model set back to ``Fusion.none()`` after, whatever happens."""
    from gemma4lab import Fusion

    try:
        model.set_fusion(fusion)
        return fn()
    finally:
        model.set_fusion(Fusion.none())


#: The dispatched ops of a library GEMM in a CPU profile's ``top_kernels``.
LIBRARY_GEMM_OPS = ("aten::mm", "aten::addmm", "aten::linear")


def library_gemms(top_kernels: dict[str, int]) -> int:
    """How many library GEMMs a profile's ``top_kernels`` (op → launches) counts."""
    return sum(n for op, n in top_kernels.items() if op in LIBRARY_GEMM_OPS)


def make_hf_model(cfg: Gemma4Config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The Hugging Face reference with random, non-trivial weights (norms and scalars around 1, not exactly 1)."""
    import transformers

    torch.manual_seed(seed)
    hcfg = transformers.Gemma4Config(**cfg.to_hf_dict())
    ref = transformers.Gemma4ForConditionalGeneration(hcfg).eval()
    with torch.no_grad():
        for _name, p in ref.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.1)
        for name, b in ref.named_buffers():
            if name.endswith("layer_scalar") or name.endswith("std_scale"):
                b.normal_(1.0, 0.1)
            elif name.endswith("std_bias"):
                b.normal_(0.0, 0.1)
    return ref.to(dtype)


@pytest.fixture(scope="session")
def tiny_config() -> Gemma4Config:
    return Gemma4Config.preset("tiny")


@pytest.fixture(scope="session")
def tiny_text_config(tiny_config) -> Gemma4Config:
    return dataclasses.replace(tiny_config, vision=None)


@pytest.fixture(scope="session")
def hf_tiny(tiny_config, tmp_path_factory):
    """(reference model, checkpoint directory written by transformers' own save_pretrained)."""
    ref = make_hf_model(tiny_config)
    path = tmp_path_factory.mktemp("tiny_ckpt")
    ref.save_pretrained(path)
    return ref, path


# ---- the kernel tests (tests/kernels) -------------------------------------------------------------------------
@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def triton_path_only(request, monkeypatch):
    """These tests check the Triton code: on CPU it must run under the interpreter (the op registration then routes
    CPU tensors to it, never to the torch reference), on a GPU compiled."""
    if request.node.get_closest_marker("gpu"):
        if _kernels().INTERPRET or not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU and compiled Triton (TRITON_INTERPRET unset)")
    elif not _kernels().INTERPRET:
        if torch.cuda.is_available():
            pytest.skip("interpreter test: run with TRITON_INTERPRET=1 (the gpu-marked tests cover this machine)")
        pytest.fail("TRITON_INTERPRET=1 must be set before gemma4lab.kernels is imported (tests/conftest.py does)")


def _kernels():
    import gemma4lab.kernels as K

    return K


#: Where a notebook's jupytext twin lives (``formats: ipynb,py//py:percent``): a ``py/`` folder beside the
#: notebooks, so JupyterLab's file browser lists only the notebooks a reader should open.
TWIN_FORMAT = "ipynb,py//py:percent"


def notebook_twin(notebook):
    """The percent-format ``.py`` twin of ``notebook`` (a Path)."""
    return notebook.parent / "py" / notebook.with_suffix(".py").name

