"""Shared pieces of the model-level benchmarks: a prompt builder, the transformers twin and argument types (the
floors live in ``gemma4lab.lab.floors``)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch


def random_prompt(n: int, vocab: int, seed: int = 0, device="cuda") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(vocab, 250000), (n,), generator=g).to(device)


def hf_twin(model, attn_implementation: str = "sdpa", experts: str = "grouped_mm"):
    """Hugging Face's Gemma4ForConditionalGeneration sharing *our* weight tensors (no second copy in memory).

    Our parameter names are the reference's, so ``load_state_dict(assign=True)`` aliases every tensor. Buffers
    that checkpoints do not store (RoPE frequencies, the embedding scale) are rebuilt on the device. ``experts`` is
    transformers' experts implementation: ``grouped_mm`` is what ``from_pretrained`` picks (its fastest); a model
    built from a config, as here, would otherwise keep the per-expert Python loop (``eager``), which is 2x slower
    at 93 tokens on an H200 and is not what a user of transformers runs. Router biases of a skewed ``model``
    (``gemma4lab.lab.routing``) are carried over, so the twin stays the same function.
    """
    import transformers

    hcfg = transformers.Gemma4Config(**model.config.to_hf_dict())
    hcfg._attn_implementation = attn_implementation
    if hcfg.text_config is not None:
        hcfg.text_config._attn_implementation = attn_implementation
    if hcfg.vision_config is not None:
        hcfg.vision_config._attn_implementation = attn_implementation
    with torch.device("meta"):
        hf = transformers.Gemma4ForConditionalGeneration(hcfg)
    state = model.state_dict()
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"transformers twin: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.lm_head.weight = hf.model.language_model.embed_tokens.weight
    dev = model.device
    for name, mod in list(hf.named_modules()):
        metas = [n for n, b in mod.named_buffers(recurse=False) if b.is_meta]
        if not metas:
            continue
        if "RotaryEmbedding" in type(mod).__name__:
            fresh = type(mod)(mod.config).to(dev)
            parent_name, _, attr = name.rpartition(".")
            setattr(hf.get_submodule(parent_name) if parent_name else hf, attr, fresh)
        elif hasattr(mod, "scalar_embed_scale"):
            mod.embed_scale = torch.tensor(mod.scalar_embed_scale, device=dev)
        else:
            raise RuntimeError(f"transformers twin: cannot rebuild meta buffers {metas} of {name}")
    leftover = [n for n, b in hf.named_buffers() if b.is_meta] + [n for n, p in hf.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"transformers twin: still on meta: {leftover[:5]}")
    hf.set_experts_implementation(experts)
    got = hf_experts_implementation(hf)
    if got is not None and got != experts:
        raise RuntimeError(f"transformers twin: asked for {experts!r} experts, the model runs {got!r}")
    from gemma4lab.lab.routing import bias_transformers_twin

    bias_transformers_twin(hf, model)
    return hf.eval()


def hf_experts_implementation(hf) -> str | None:
    """The experts implementation transformers' MoE layers will actually dispatch to (None: no MoE layer)."""
    for mod in hf.modules():
        if type(mod).__name__.endswith("TextExperts"):
            return mod.config._experts_implementation
    return None


# ---- command-line argument types: a bad value is a one-line usage error before any work, never a traceback -------
def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {v}")
    return v


def positive_ints(text: str) -> tuple[int, ...]:
    """Comma-separated whole numbers >= 1, e.g. ``93,189,1453``."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 1, got {text!r}")
    return tuple(positive_int(p.strip()) for p in parts)


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def device_arg(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a device such as 'cuda', 'cuda:0' or 'cpu', got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected a cpu or cuda device, got {text!r}")
    return text


def out_dir(text: str) -> Path:
    """A directory for results: it may not exist yet, but it may not be a file, and it must be creatable."""
    import os

    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"--out {text} is a file, not a directory")
    ancestor = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not os.access(ancestor, os.W_OK):
        raise argparse.ArgumentTypeError(f"--out {text}: {ancestor} is not writable")
    return path


def fmt_ms(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"
