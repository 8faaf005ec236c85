"""Routing realism for random weights: a knob that skews the expert load the way trained routers do, and the
statistics that say how skewed a run really was.

Random router weights route uniformly: at 93 tokens (744 routed slots) they touch all 128 experts, and at large T
every expert gets the same share. Trained routers prefer some experts, so a short prompt touches fewer of them and a
long one loads them unevenly — which changes what the expert GEMMs cost (fewer weight bytes to stream at small T,
a longer critical path at large T). Timing only uniform routing would flatter or penalise a kernel for the wrong
reason.

The knob adds a fixed bias to each MoE layer's router logits (``Router.logit_bias``; off by default, so the model
is the reference). The bias is Zipf-shaped: expert of rank ``r`` (a random order per layer) gets
``-β · s · ln r``, where ``s`` is the exponent and ``β`` the spread of that layer's own logits
(``std · √6 / π``, the scale at which Gaussian noise acts like Gumbel noise). With that choice the top-1 expert of a
token is drawn roughly with probability ∝ ``r^-s``: ``s = 0`` is uniform, ``s ≈ 1`` a Zipf law.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor


def _moe_layers(model) -> list[tuple[int, Any]]:
    return [(i, layer) for i, layer in enumerate(model.language_model.layers) if getattr(layer, "moe", False)]


def _router_logit_std(model, prompts: Sequence[Tensor]) -> dict[int, float]:
    """The standard deviation of each MoE layer's router logits over ``prompts`` (one prefill, hooks on ``proj``)."""
    stds: dict[int, float] = {}
    hooks = []
    for i, layer in _moe_layers(model):
        def hook(mod, inp, out, i=i):
            stds[i] = float(out.float().std())
        hooks.append(layer.router.proj.register_forward_hook(hook))
    try:
        model.prefill(list(prompts))
    finally:
        for h in hooks:
            h.remove()
    return stds


@torch.no_grad()
def skew_routing(model, exponent: float, calibration: Sequence[Tensor], *, seed: int = 0) -> dict[str, Any]:
    """Give every MoE router of ``model`` a Zipf-shaped logit bias of ``exponent`` (see module docstring);
    ``exponent=0`` removes it. ``calibration`` are prompts whose logits set each layer's scale. Returns the recipe."""
    if not isinstance(exponent, (int, float)) or isinstance(exponent, bool) or not math.isfinite(exponent) \
            or exponent < 0:
        raise ValueError(f"exponent must be a finite number >= 0, got {exponent!r}")
    layers = _moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layers to skew")
    for _, layer in layers:
        layer.router.logit_bias = None
    if exponent == 0:
        return {"exponent": 0.0}
    stds = _router_logit_std(model, calibration)
    gen = torch.Generator().manual_seed(seed)
    for i, layer in layers:
        e = layer.router.proj.out_features
        rank = torch.empty(e, dtype=torch.long)
        rank[torch.randperm(e, generator=gen)] = torch.arange(1, e + 1)
        beta = stds[i] * math.sqrt(6) / math.pi
        bias = -beta * exponent * torch.log(rank.double())
        layer.router.logit_bias = bias.to(device=model.device, dtype=torch.float32)
    return {"exponent": float(exponent), "seed": seed, "scale": "std(logits)·√6/π per layer",
            "logit_std_mean": sum(stds.values()) / len(stds)}


@contextlib.contextmanager
def expert_loads(model) -> Iterator[list[Tensor]]:
    """While the block runs, every MoE layer call of ``model`` appends its load: the rows routed to each expert
    (``[num_experts]`` counts, on the host). A prefill gives one entry per MoE layer, a decode step another per
    layer, so a caller can average over layers, steps or both. The hooks sync the host: never inside a timed run."""
    loads: list[Tensor] = []
    hooks = []
    for _, layer in _moe_layers(model):
        n_exp = layer.experts.num_experts

        def hook(mod, args, n_exp=n_exp):
            loads.append(torch.bincount(args[1].reshape(-1).long(), minlength=n_exp).float().cpu())
        hooks.append(layer.experts.register_forward_pre_hook(hook))
    try:
        yield loads
    finally:
        for h in hooks:
            h.remove()


def experts_hit(loads: Sequence[Tensor]) -> float:
    """Distinct experts that received a row, averaged over the MoE layer calls of :func:`expert_loads`."""
    if not loads:
        raise ValueError("no MoE layer ran (the model has no MoE layers, or nothing was run)")
    return sum(float((c > 0).sum()) for c in loads) / len(loads)


@torch.no_grad()
def routing_stats(model, prompts: Sequence[Tensor]) -> dict[str, float]:
    """How the experts were loaded in one prefill of ``prompts``, averaged over MoE layers: ``experts_hit``
    (distinct experts that received a token), ``max_over_mean_load`` (the busiest expert's routed rows over the
    mean), and ``top8_share`` (share of routed rows that went to the 8 busiest experts)."""
    with expert_loads(model) as loads:
        model.prefill(list(prompts))
    if not loads:
        raise ValueError("the model has no MoE layers")
    hit = experts_hit(loads)
    peak = sum(float(c.max() / c.mean()) for c in loads) / len(loads)
    top8 = sum(float(c.sort(descending=True).values[:8].sum() / c.sum()) for c in loads) / len(loads)
    return {"experts_hit": hit, "max_over_mean_load": peak, "top8_share": top8, "layers": len(loads)}


def bias_transformers_twin(hf, model) -> int:
    """Give a transformers twin (``gemma4lab.lab.bench.common.hf_twin``) the same router biases as ``model``,
    through forward hooks on its routers' ``proj``. Returns how many layers got one."""
    n = 0
    hf_layers = hf.model.language_model.layers
    for i, layer in _moe_layers(model):
        bias = layer.router.logit_bias
        if bias is None:
            continue
        hf_layers[i].router.proj.register_forward_hook(lambda mod, inp, out, b=bias: out + b.to(out.dtype))
        n += 1
    return n
