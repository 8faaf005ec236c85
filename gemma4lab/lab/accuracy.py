"""Accuracy figures that can catch a bug, at full width.

A random 30-layer MoE is chaotic: one rounding flips a top-k choice somewhere and the difference grows layer by
layer, so two correct fp32 implementations end ~0.3 apart (relative) at the logits, and a whole-model bf16 error
looks the same with or without a defect. Two measurements stay sharp:

* :func:`shallow_parity`: models of 1, 2 and 6 layers at full width, where chaos has not set in. Ours and
  transformers' in fp32 against a float64 truth (transformers' own model in float64 on the same weights), beside
  transformers against itself with another experts implementation (the reference's own spread). A kernel bug
  shows as an error orders of magnitude above those.
* :func:`per_layer_errors`: all layers of the full model, teacher-forced: every layer is fed the fp32 truth's input
  (an fp32 copy of the same layer, unfused, masked-SDPA attention, run layer after layer), and its bf16 output is
  compared with the fp32 layer's output. Ours (fused and unfused) beside transformers' bf16 layer, which gets the
  same input through a forward pre-hook.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gemma4lab.attention import PackedBatch
from gemma4lab.lab.measure import rel_err, release_memory
from gemma4lab.model.config import Gemma4Config
from gemma4lab.model.decoder import Stream, run_layer
from gemma4lab.runtime.fusion import Fusion


def top1_agreement(logits: Tensor, truth: Tensor) -> float:
    """Share of rows whose arg-max token equals the truth's."""
    return float((logits.argmax(-1) == truth.argmax(-1)).float().mean())


@torch.no_grad()
def shallow_parity(config: Gemma4Config, device: torch.device | str, depths: Sequence[int] = (1, 2, 6),
                   tokens: int = 93, seed: int = 3) -> dict[str, Any]:
    """Logits of ours and of transformers at full width and shallow depth, against a float64 truth.

    For each depth: random fp32 weights; the truth is transformers' model in float64 on those weights (eager experts,
    SDPA); then ours (unfused and fused) and transformers (its default experts and eager experts) in fp32, and both
    in bf16 (relative error and top-1 agreement), all on the same weights and prompt."""
    from gemma4lab.lab.bench.common import hf_twin, random_prompt
    from gemma4lab.model.loading import random_init

    device = torch.device(device)
    out: dict[str, Any] = {"tokens": tokens, "depths": {}}
    for depth in depths:
        cfg = Gemma4Config(text=config.replace_text(num_hidden_layers=depth).text, vision=None)
        ids = random_prompt(tokens, cfg.text.vocab_size, seed=11, device=device)
        m = random_init(cfg, dtype=torch.float32, device=device, seed=seed)
        m64 = copy.deepcopy(m).to(torch.float64)
        m64.init_buffers()
        hf64 = hf_twin(m64, experts="eager")
        truth = hf64(input_ids=ids[None], use_cache=False).logits[0].double()
        del hf64, m64
        release_memory()
        row: dict[str, Any] = {}
        for name, fusion in (("ours_unfused", Fusion.none()), ("ours_fused", Fusion.all())):
            m.set_fusion(fusion)
            ours32 = m.prefill([ids], all_logits=True)  # the fused logits are kept, for the transformers row
            row[f"{name}_fp32"] = rel_err(ours32, truth)
        hf = hf_twin(m)
        row["hf_experts_fp32"] = hf.config.get_text_config()._experts_implementation
        theirs32 = hf(input_ids=ids[None], use_cache=False).logits[0]
        row["transformers_fp32"] = rel_err(theirs32, truth)
        row["ours_fused_vs_transformers_fp32"] = rel_err(ours32, theirs32)
        hf_eager = hf_twin(m, experts="eager")
        theirs32_eager = hf_eager(input_ids=ids[None], use_cache=False).logits[0]
        row["transformers_eager_experts_fp32"] = rel_err(theirs32_eager, truth)
        row["transformers_vs_itself_fp32"] = rel_err(theirs32_eager, theirs32)
        del hf, hf_eager
        m.to(torch.bfloat16).init_buffers()  # RoPE frequencies stay fp32, as the loader leaves them
        ours16 = m.prefill([ids], all_logits=True)
        theirs16 = hf_twin(m)(input_ids=ids[None], use_cache=False).logits[0]
        row.update(ours_fused_bf16=rel_err(ours16, truth), transformers_bf16=rel_err(theirs16, truth),
                   ours_fused_bf16_top1=top1_agreement(ours16, truth),
                   transformers_bf16_top1=top1_agreement(theirs16, truth))
        out["depths"][str(depth)] = row
        del m, truth
        release_memory()
    return out


def _ctx(lm, n: int, device: torch.device, backend: str | None = None):
    return lm.make_context(PackedBatch.from_lengths([n], device), backend=backend)


@torch.no_grad()
def per_layer_errors(model, ids: Tensor, *, hf=None, fp8: bool = False) -> dict[str, Any]:
    """Teacher-forced error of every decoder layer of ``model`` (bf16) against an fp32 copy of that layer.

    ``ids`` is one prompt [T]. ``hf``: a transformers twin of ``model`` (sharing its weights) to measure beside
    ours. ``fp8``: also each layer with its experts quantised to FP8 (``gemma4lab.quantize_experts`` on a copy of
    the layer, fused), against the same truth: weights only (``ours_fused_fp8``) and weights and activations
    (``ours_fused_fp8a8``). Returns per-layer relative errors (lists, layer
    order) and their medians and maxima."""
    lm = model.language_model
    dev, dt, n = model.device, model.dtype, int(ids.numel())
    truth_ctx, ctx = _ctx(lm, n, dev, backend="sdpa"), _ctx(lm, n, dev)

    def attend_with(c):
        return lambda i, q, k, v: lm.attend(i, q, k, v, c)

    # The fp32 truth, layer after layer: each layer's fp32 output is the next one's input.
    truth = [lm.embed(ids.to(dev)).float()]
    for i in range(len(lm.layers)):
        layer32 = copy.deepcopy(lm.layers[i]).float()
        truth.append(run_layer(lm, i, Stream(truth[i]), truth_ctx.cos_sin, attend_with(truth_ctx), Fusion.none(),
                               layer=layer32).float())
        del layer32
    res: dict[str, Any] = {"tokens": n, "layers": len(lm.layers), "dtype": str(dt).replace("torch.", "")}
    for name, fusion in (("ours_unfused", Fusion.none()), ("ours_fused", Fusion.all())):
        res[name] = [rel_err(run_layer(lm, i, Stream(truth[i].to(dt)), ctx.cos_sin, attend_with(ctx), fusion),
                             truth[i + 1]) for i in range(len(lm.layers))]
    if fp8 and lm.config.enable_moe_block:
        from gemma4lab.model.quantize import quantize_experts

        for key, acts in (("ours_fused_fp8", "bf16"), ("ours_fused_fp8a8", "fp8")):
            errs = []
            for i in range(len(lm.layers)):
                layer8 = copy.deepcopy(lm.layers[i])
                quantize_experts(layer8, activations=acts)
                errs.append(rel_err(run_layer(lm, i, Stream(truth[i].to(dt)), ctx.cos_sin, attend_with(ctx),
                                              Fusion.all(), layer=layer8), truth[i + 1]))
                del layer8
            res[key] = errs
    if hf is not None:
        try:
            res["transformers"] = _transformers_per_layer(hf, truth, dt)
        except Exception as e:  # ours is still worth recording; say what failed on the reference's side
            res["transformers_error"] = f"{type(e).__name__}: {e}"[:300]
    for key in ("ours_unfused", "ours_fused", "ours_fused_fp8", "ours_fused_fp8a8", "transformers"):
        if key in res:
            errs = sorted(res[key])
            res[f"{key}_median"], res[f"{key}_max"] = errs[len(errs) // 2], errs[-1]
    if "transformers" in res:
        res["ours_fused_over_transformers"] = [a / b for a, b in zip(res["ours_fused"], res["transformers"])]
    return res


def _transformers_per_layer(hf, truth: list[Tensor], dtype: torch.dtype) -> list[float]:
    """One forward of transformers' text model in which every decoder layer's input is replaced by the truth's
    (a forward pre-hook) and its output recorded: teacher forcing without calling a layer's private API."""
    layers = hf.model.language_model.layers
    outs: dict[int, Tensor] = {}
    hooks = []
    for i, layer in enumerate(layers):
        def pre_hook(mod, args, kwargs, i=i):
            return (truth[i].to(dtype)[None], *args[1:]), kwargs

        def post_hook(mod, args, kwargs, output, i=i):
            outs[i] = (output[0] if isinstance(output, tuple) else output)[0]
        hooks.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
        hooks.append(layer.register_forward_hook(post_hook, with_kwargs=True))
    try:
        hf.model.language_model(inputs_embeds=truth[0].to(dtype)[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [rel_err(outs[i], truth[i + 1]) for i in range(len(layers))]
