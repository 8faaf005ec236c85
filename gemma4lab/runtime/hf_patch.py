"""gemma4lab's fused kernels inside the model users already have: transformers' Gemma 4, patched in place.

``patch_transformers(model)`` takes a loaded ``transformers.Gemma4ForConditionalGeneration`` (or
``Gemma4ForCausalLM``, ``Gemma4Model``, ``Gemma4TextModel``, or a ``peft`` model around one) and replaces the
``forward`` of each of its text decoder layers, on the instance, with gemma4lab's decoder program run over that
layer's own modules and parameters. Nothing is copied and the model keeps its API: ``generate``, ``from_pretrained``,
the processor and the chat template see the same object. ``handle.unpatch()`` (or leaving the ``with`` block)
deletes the instance attributes again, so the class's forward is back exactly.

What runs where:

* **The layer math is gemma4lab's one decoder program** (``gemma4lab.model.decoder``: ``run_layer`` →
  ``DecoderLayer.pre_attention`` / ``post_attention``, ``Attention.qkv``, ``MLP``, ``Router``, ``Experts``), not a
  second copy of it. A *view* (:class:`_View`) lends those methods to transformers' module: ``self.q_proj``,
  ``self.router.scale``, ``self.experts.gate_up_proj`` inside them read the live transformers attribute, so
  an adapter that replaces a projection after patching is still called. The fusions are the model's
  (:class:`gemma4lab.Fusion`) except ``next_norm``: it writes the *next* layer's input norm from this layer's
  epilogue, and a per-layer forward returns the residual stream to transformers' loop, which norms it itself.
* **Transformers keeps the plumbing.** Masks, positions, RoPE tables (``position_embeddings``), the KV cache
  (``cache.update``), the attention interface and ``generate`` stay transformers'. The attention call between the
  two halves of the program is transformers' own (``ALL_ATTENTION_FUNCTIONS`` for the configured implementation).
* **Triton attention through ``AttentionInterface``.** With ``attention="triton"`` (the default on CUDA) the text
  config's ``_attn_implementation`` becomes ``"gemma4lab"``, registered with transformers' ``AttentionInterface``
  (and SDPA's boolean masks in ``AttentionMaskInterface``). It reads the mask transformers built, checks that each
  row's visible keys are one run the kernel can express (causal, the window, an image's bidirectional block; one key
  end per row) and runs ``gemma_prefill_attention``; any other mask (left padding, a trimmed sliding cache that
  does not line up, dropout in training) goes to transformers' SDPA, counted in ``ATTENTION_STATS``.

What is refused, up front and before anything is changed (``ValueError``/``TypeError`` naming what differs):

* a transformers whose Gemma 4 module layout differs from the one this was written against (a decoder layer,
  attention, router, experts or norm that is missing an attribute, has other children or another forward
  signature); a config gemma4lab does not implement (per-layer inputs, KV sharing, double-wide MLP, attention bias,
  another activation or RoPE type: the same checks as ``gemma4lab.Gemma4Config``);
* attachments the fused path would skip: hooks on a module whose ``forward`` the program does not call (the
  attention module, the norms, the MLP/router/experts modules; hooks on the layer itself and on the projections
  fire, and a ``peft`` LoRA on a projection is called like any module), a replaced module of another type there,
  an instance-level ``forward`` or an accelerate hook, or global module hooks. The same checks run on every
  forward, so an attachment added after patching is refused too, never skipped; ``output_attentions`` and
  ``output_router_logits`` (recorded by transformers from modules the program does not call) likewise.

Prefill through piecewise CUDA graphs (``pcg=True``): the model's ``forward`` is also replaced on the instance, and
prefill-shaped calls (``model(ids)``, ``generate``'s first step) run gemma4lab's ``PiecewiseCudaGraphRunner`` over
the same views, filling transformers' ``DynamicCache`` for the decode steps that follow (see
:mod:`gemma4lab.runtime.hf_pcg`).

Gradients: the kernels have no backward. When autograd would record through a layer (grad enabled and a parameter
or the input requires grad), that layer runs transformers' own forward instead, with a one-time warning and a count
in ``handle.stats["grad_fallbacks"]``; ``requires_grad`` flags are never touched. Under ``torch.no_grad()``,
``torch.inference_mode()`` and in ``generate`` the fused path runs.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import warnings
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gemma4lab.model.decoder import Attention, DecoderLayer, Stream, run_layer
from gemma4lab.model.layers import MLP, Experts, Router
from gemma4lab.runtime.fusion import Fusion

#: The transformers releases the patch was written and tested against (5.24 on CPU, 5.17 on the H200); other
#: releases are accepted when their module layout passes the checks below.
TESTED_TRANSFORMERS = "5.17.0 and 5.24.0"
#: The name of gemma4lab's Triton attention in transformers' ``AttentionInterface``.
ATTENTION_NAME = "gemma4lab"
#: How often the registered attention ran the kernel and why it handed a call to SDPA instead.
ATTENTION_STATS: Counter = Counter()

_MODELING = "transformers.models.gemma4.modeling_gemma4"
_LAYER_ARGS = ("self", "hidden_states", "per_layer_input", "shared_kv_states", "position_embeddings",
               "attention_mask", "position_ids", "cache", "kwargs")
_ATTN_ARGS = ("self", "hidden_states", "position_embeddings", "attention_mask", "shared_kv_states", "cache", "kwargs")
#: The KV cache argument's name: ``cache`` from transformers 5.2x on, ``past_key_values`` before (the one layout
#: difference between the releases the patch runs on; outputs name their cache field the same way).
CACHE_ARGS = ("cache", "past_key_values")


def cache_arg(cls: type) -> str | None:
    """Which of :data:`CACHE_ARGS` ``cls.forward`` takes (None: neither)."""
    names = inspect.signature(cls.forward).parameters
    return next((n for n in CACHE_ARGS if n in names), None)
#: The handles whose patch is in place (weakly: a patched model that is dropped is collected with its handle).
LIVE: weakref.WeakSet = weakref.WeakSet()


# ---- views: gemma4lab's methods over transformers' modules --------------------------------------------------------
class _View:
    """``ours``' methods (copied from our class, see :func:`_view_class`) over a live transformers module: any name
    the view does not define itself is read from the module at the moment it is used."""

    def __init__(self, module: nn.Module, **extras: Any) -> None:
        self.__dict__.update(extras)
        self.__dict__["_m"] = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_m"], name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)


def _view_class(ours: type, **more: Any) -> type:
    """A :class:`_View` with the methods and constants that ``ours`` defines itself (not those of ``nn.Module``)."""
    members = {k: v for k, v in vars(ours).items() if not (k.startswith("__") and k.endswith("__"))}
    return type(f"{ours.__name__}OverTransformers", (_View,), {**members, **more})


def _owned(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """The fused q/k/v kernel writes a projection's output in place: where a hook may have kept that output, the
    program gets a copy, so the hook's tensor stays what the projection returned."""
    if any(m._forward_hooks for m in module.modules()):
        return lambda x: module(x).clone()
    return module


_AttentionView = _view_class(Attention, **{name: property(lambda v, n=name: _owned(getattr(v._m, n)))
                                           for name in ("q_proj", "k_proj")},
                             v_proj=property(lambda v: None if v._m.v_proj is None else _owned(v._m.v_proj)))
_MLPView = _view_class(MLP)
_RouterView = _view_class(Router)
_ExpertsView = _view_class(Experts)
_LayerView = _view_class(
    DecoderLayer,
    self_attn=property(lambda v: _AttentionView(v._m.self_attn, eps=v.eps, sliding=v._m.self_attn.is_sliding)),
    mlp=property(lambda v: _MLPView(v._m.mlp)),
    router=property(lambda v: _RouterView(v._m.router, top_k=v.top_k, logit_bias=None)),
    experts=property(lambda v: _ExpertsView(v._m.experts)),
)


class _TextView:
    """The ``lm`` that ``run_layer`` reads: the layer views and the next layer's input-norm weight."""

    def __init__(self, text: nn.Module, layers: list[_View]) -> None:
        self._text, self.layers = text, layers

    def next_norm_weight(self, i: int) -> Tensor:
        layers = self._text.layers
        return layers[i + 1].input_layernorm.weight if i + 1 < len(layers) else self._text.norm.weight


# ---- finding the text decoder ---------------------------------------------------------------------------------
def _base_model(model: nn.Module) -> nn.Module:
    """``model``, or the transformers model inside a peft model."""
    if callable(getattr(model, "get_base_model", None)) and type(model).__module__.startswith("peft"):
        return model.get_base_model()
    return model


def _text_model(model: nn.Module) -> nn.Module:
    """transformers' ``Gemma4TextModel`` inside ``model`` (unwrapping a peft model first)."""
    model = _base_model(model)
    name = type(model).__name__
    paths = {"Gemma4ForConditionalGeneration": ("model", "language_model"), "Gemma4Model": ("language_model",),
             "Gemma4ForCausalLM": ("model",), "Gemma4TextModel": ()}
    if name not in paths or not type(model).__module__.startswith("transformers."):
        raise TypeError(f"patch_transformers takes a transformers Gemma 4 model ({', '.join(paths)}), got "
                        f"{type(model).__module__}.{name}")
    text = model
    for attr in paths[name]:
        text = getattr(text, attr, None)
        if text is None:
            raise ValueError(f"{name} has no .{'.'.join(paths[name])}: this transformers' Gemma 4 layout differs "
                             f"from the one gemma4lab patches (written against transformers {TESTED_TRANSFORMERS})")
    if type(text).__name__ != "Gemma4TextModel" or type(text).__module__ != _MODELING:
        raise ValueError(f"expected {_MODELING}.Gemma4TextModel at .{'.'.join(paths[name])}, found "
                         f"{type(text).__module__}.{type(text).__name__}")
    return text


# ---- up-front checks ---------------------------------------------------------------------------------------------
def _args(fn: Callable) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def _check_layout(text: nn.Module):
    """Every fact the patch relies on, checked before anything is changed. Returns gemma4lab's ``TextConfig`` of
    the model (``ValueError`` naming each difference otherwise)."""
    from gemma4lab.model.config import _text_from_hf

    hf_mod = sys.modules[_MODELING]
    try:
        cfg = _text_from_hf(text.config.to_dict())
    except ValueError as e:
        raise ValueError(f"this Gemma 4 variant is not supported by patch_transformers: {e}") from None
    problems: list[str] = []
    name = cache_arg(hf_mod.Gemma4TextDecoderLayer) or "cache"
    for cls, want in ((hf_mod.Gemma4TextDecoderLayer, _LAYER_ARGS), (hf_mod.Gemma4TextAttention, _ATTN_ARGS)):
        got = _args(cls.forward)
        want = tuple(name if a == "cache" else a for a in want)
        if got != want:
            problems.append(f"{cls.__name__}.forward takes {got}, the patch expects {want}")
    if getattr(text, "hidden_size_per_layer_input", 0):
        problems.append("per-layer inputs (hidden_size_per_layer_input > 0)")
    if getattr(text, "first_kv_shared_layer_idx", cfg.num_hidden_layers) != cfg.num_hidden_layers:
        problems.append("KV sharing (num_kv_shared_layers > 0)")
    for attr in ("layers", "norm", "rotary_emb", "embed_tokens"):
        if not hasattr(text, attr):
            problems.append(f"Gemma4TextModel has no .{attr}")
    layers = getattr(text, "layers", [])
    if len(layers) != cfg.num_hidden_layers:
        problems.append(f"{len(layers)} decoder layers for num_hidden_layers={cfg.num_hidden_layers}")
    for i, layer in enumerate(layers):
        problems += [f"layers.{i}: {p}" for p in _layer_problems(layer, i, cfg, hf_mod)]
    if problems:
        import transformers

        raise ValueError("patch_transformers: this model differs from the Gemma 4 layout the patch runs faithfully "
                         f"(written against transformers {TESTED_TRANSFORMERS}, this is {transformers.__version__}); "
                         "nothing was patched:\n  "
                         + "\n  ".join(problems[:20]) + (f"\n  ... {len(problems) - 20} more" if len(problems) > 20
                                                         else ""))
    return cfg


def _layer_problems(layer: nn.Module, i: int, cfg, hf_mod) -> list[str]:
    """What differs in decoder layer ``i`` from the layout the patch reads (an empty list: nothing)."""
    out: list[str] = []

    def want_type(path: str, obj: Any, cls: type) -> bool:
        if type(obj) is not cls:
            out.append(f"{path} is {type(obj).__module__}.{type(obj).__name__}, expected transformers' "
                       f"{cls.__name__}" + ("" if type(obj).__module__.startswith("transformers.") else
                                           " (a wrapper or replacement, e.g. peft's target_parameters or "
                                           "modules_to_save: the fused kernels read the parameters and would skip "
                                           "it)"))
            return False
        return True

    def norm(path: str, m: Any, dim: int, scale: bool = True) -> None:
        if want_type(path, m, hf_mod.Gemma4RMSNorm):
            if m.eps != cfg.rms_norm_eps:
                out.append(f"{path}.eps={m.eps}, the layer's other norms use {cfg.rms_norm_eps}")
            if m.with_scale != scale or (scale and tuple(m.weight.shape) != (dim,)):
                out.append(f"{path}: expected {'a [' + str(dim) + '] weight' if scale else 'no weight'}")

    if not want_type("the layer", layer, hf_mod.Gemma4TextDecoderLayer):
        return out
    moe = cfg.enable_moe_block
    norms = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
    if moe:
        norms += ["post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2"]
    children = {"self_attn", "mlp", *norms} | ({"router", "experts"} if moe else set())
    got = {n for n, _ in layer.named_children()}
    if got != children:
        out.append(f"children {sorted(got)} differ from {sorted(children)}")
        return out
    h, d, kv = cfg.hidden_size, cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
    for n in norms:
        norm(n, getattr(layer, n), h)
    scalar = getattr(layer, "layer_scalar", None)
    if not isinstance(scalar, Tensor) or scalar.numel() != 1:
        out.append("no one-element layer_scalar buffer")
    attn = layer.self_attn
    if want_type("self_attn", attn, hf_mod.Gemma4TextAttention):
        facts = {"layer_idx": i, "head_dim": d, "is_sliding": cfg.is_sliding(i), "scaling": 1.0,
                 "is_kv_shared_layer": False,
                 "sliding_window": cfg.sliding_window if cfg.is_sliding(i) else None}
        for k, v in facts.items():
            if getattr(attn, k, "<missing>") != v:
                out.append(f"self_attn.{k}={getattr(attn, k, '<missing>')!r}, expected {v!r}")
        kids = {"q_proj", "k_proj", "o_proj", "q_norm", "k_norm", "v_norm"} | (
            set() if cfg.layer_k_eq_v(i) else {"v_proj"})
        got = {n for n, _ in attn.named_children()}
        if got != kids:
            out.append(f"self_attn children {sorted(got)} differ from {sorted(kids)}")
        elif cfg.layer_k_eq_v(i) != (attn.v_proj is None):
            out.append("self_attn.v_proj disagrees with attention_k_eq_v")
        else:
            norm("self_attn.q_norm", attn.q_norm, d)
            norm("self_attn.k_norm", attn.k_norm, d)
            norm("self_attn.v_norm", attn.v_norm, d, scale=False)
            sizes = {"q_proj": cfg.num_attention_heads * d, "k_proj": kv * d, "v_proj": kv * d}
            for name, n in sizes.items():  # out_features: nn.Linear, and the adapters and quantised linears on it
                got_n = getattr(getattr(attn, name), "out_features", n) if getattr(attn, name) is not None else n
                if got_n != n:
                    out.append(f"self_attn.{name} gives {got_n} features, expected {n}")
    mlp = layer.mlp
    if want_type("mlp", mlp, hf_mod.Gemma4TextMLP):
        if {n for n, _ in mlp.named_children()} != {"gate_proj", "up_proj", "down_proj", "act_fn"}:
            out.append(f"mlp children {sorted(n for n, _ in mlp.named_children())}")
        elif type(mlp.act_fn).__name__ not in ("GELUTanh", "PytorchGELUTanh"):
            out.append(f"mlp.act_fn is {type(mlp.act_fn).__name__}, expected the tanh GELU")
    if moe:
        r = layer.router
        if want_type("router", r, hf_mod.Gemma4TextRouter):
            for k, v in (("eps", cfg.rms_norm_eps), ("scalar_root_size", h ** -0.5)):
                if getattr(r, k, None) != v:
                    out.append(f"router.{k}={getattr(r, k, '<missing>')!r}, expected {v!r}")
            for k, shape in (("scale", (h,)), ("per_expert_scale", (cfg.num_experts,))):
                p = getattr(r, k, None)
                if not isinstance(p, Tensor) or tuple(p.shape) != shape:
                    out.append(f"router.{k} is not a {list(shape)} tensor")
            norm("router.norm", getattr(r, "norm", None), h, scale=False)
            if not hasattr(r, "proj"):
                out.append("router has no .proj")
        e = layer.experts
        if want_type("experts", e, hf_mod.Gemma4TextExperts):
            ne, ii = cfg.num_experts, cfg.moe_intermediate_size
            for k, shape in (("gate_up_proj", (ne, 2 * ii, h)), ("down_proj", (ne, h, ii))):
                p = getattr(e, k, None)
                if not isinstance(p, Tensor) or tuple(p.shape) != shape:
                    out.append(f"experts.{k} is not a {list(shape)} tensor")
            if getattr(e, "num_experts", None) != ne:
                out.append(f"experts.num_experts={getattr(e, 'num_experts', None)}, expected {ne}")
    return out


# ---- attachments -------------------------------------------------------------------------------------------------
def _capture_key(hook: Callable) -> str | None:
    """The output transformers' ``capture_outputs`` hook records (``attentions``, ``router_logits``, ...), or None
    if ``hook`` is not one of those (inactive unless that output was asked for)."""
    if getattr(hook, "__name__", "") != "output_capturing_hook" or \
            getattr(hook, "__module__", "") != "transformers.utils.output_capturing":
        return None
    cells = dict(zip(hook.__code__.co_freevars, hook.__closure__ or ()))
    return cells["key"].cell_contents if "key" in cells else None


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _attachments(m: nn.Module) -> tuple[list[str], list[str]]:
    """(what would be skipped if ``m``'s forward is not called, the outputs transformers' capture hooks on it
    record)."""
    skipped, captures = [], []
    for kind in _HOOK_DICTS:
        for hook in getattr(m, kind).values():
            key = _capture_key(hook) if kind == "_forward_hooks" else None
            if key is not None:
                captures.append(key)
            else:
                skipped.append(f"a {kind.strip('_')[:-1].replace('_', ' ')} "
                               f"({getattr(hook, '__qualname__', type(hook).__name__)})")
    if "forward" in m.__dict__:
        skipped.append("an instance-level forward replacement")
    if hasattr(m, "_hf_hook"):
        skipped.append("an accelerate hook (device_map offloading)")
    return skipped, captures


def _global_hooks() -> list[str]:
    g = torch.nn.modules.module
    names = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
             "_global_backward_hooks")
    return [n.strip("_").replace("_", " ") for n in names if getattr(g, n, None)]


#: The modules of a decoder layer whose forward the fused program does not call (it reads their parameters, or
#: calls their children), with transformers' class each must be. The layer itself and the projections (q/k/v/o,
#: gate/up/down, router.proj) are called as modules, so their hooks fire and adapters on them run.
_SKIPPED = {"self_attn": "Gemma4TextAttention", "self_attn.q_norm": "Gemma4RMSNorm",
            "self_attn.k_norm": "Gemma4RMSNorm", "self_attn.v_norm": "Gemma4RMSNorm", "mlp": "Gemma4TextMLP",
            "mlp.act_fn": None, "input_layernorm": "Gemma4RMSNorm", "post_attention_layernorm": "Gemma4RMSNorm",
            "pre_feedforward_layernorm": "Gemma4RMSNorm", "post_feedforward_layernorm": "Gemma4RMSNorm"}
_SKIPPED_MOE = {"router": "Gemma4TextRouter", "router.norm": "Gemma4RMSNorm", "experts": "Gemma4TextExperts",
                "post_feedforward_layernorm_1": "Gemma4RMSNorm", "post_feedforward_layernorm_2": "Gemma4RMSNorm",
                "pre_feedforward_layernorm_2": "Gemma4RMSNorm"}


def _skipped(moe: bool) -> list[tuple[str, tuple[str, ...], type | None]]:
    """``(path, its parts, the class it must be)`` for every module in :data:`_SKIPPED`."""
    hf = sys.modules[_MODELING]
    table = {**_SKIPPED, **(_SKIPPED_MOE if moe else {})}
    return [(path, tuple(path.split(".")), getattr(hf, cls) if cls else None) for path, cls in table.items()]


def _module_at(layer: nn.Module, parts: tuple[str, ...]) -> nn.Module | None:
    m = layer
    for part in parts:
        m = m._modules.get(part) if isinstance(m, nn.Module) else None
    return m


def _plain(m: nn.Module | None, want: type | None) -> bool:
    """``m`` is transformers' own module with nothing attached (the fast path of the per-forward check)."""
    return m is not None and (want is None or type(m) is want) and not (
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        or "forward" in m.__dict__ or "_hf_hook" in m.__dict__)


# ---- the patched forward -------------------------------------------------------------------------------------------
class TransformersPatch:
    """The handle :func:`patch_transformers` returns: ``unpatch()``, or use it as a context manager.

    ``stats``: ``grad_fallbacks`` (layer calls that ran transformers' forward because autograd needed them) and
    ``fused_calls`` (layer calls through the program)."""

    def __init__(self, model: nn.Module, text: nn.Module, cfg, fusion: Fusion, attention: str) -> None:
        self.model, self.text, self.config = model, text, cfg
        self.fusion = fusion
        #: what each layer runs: ``fusion`` without ``next_norm`` (see the module docstring)
        self.layer_fusion = dataclasses.replace(fusion, next_norm=False)
        self.attention = attention
        self.stats: Counter = Counter()
        self._hf = sys.modules[_MODELING]
        #: this release's name of the KV cache argument (and output field): ``cache`` or ``past_key_values``
        self.cache_arg = cache_arg(self._hf.Gemma4TextDecoderLayer) or "cache"
        self._skipped = _skipped(cfg.enable_moe_block)
        layers = list(text.layers)
        self._layers = layers
        self._view = _TextView(text, [_LayerView(layer, layer=i, moe=cfg.enable_moe_block, eps=cfg.rms_norm_eps,
                                                 top_k=cfg.top_k_experts) for i, layer in enumerate(layers)])
        self._forwards: list[Callable] = []
        self._attn_before: str | None = None
        self._warned = False
        self.patched = False
        #: the piecewise CUDA graph runner that takes prefill calls (``pcg=``), and its route
        self.runner = None
        self._route = None

    # ---- attachments, checked at patch time and on every forward --------------------------------------------
    def check_attachments(self, layer: nn.Module, i: int, capturing: dict | None = None,
                          patching: bool = False) -> None:
        """Raise if something attached to layer ``i`` would be skipped by the fused program. The layer's own hooks
        fire (it is called as usual); ``patching``: also refuse a forward that something else already replaced."""
        if not patching and not _global_hooks() and all(_plain(_module_at(layer, parts), want)
                                                        for _, parts, want in self._skipped):
            return  # nothing attached anywhere: the common case, checked in ~10 us a layer
        problems = [f"global module hooks ({', '.join(g)})" for g in [_global_hooks()] if g]
        if patching and "forward" in layer.__dict__:
            problems.append(f"layers.{i} has an instance-level forward (another patch, or an accelerate hook): "
                            "patching over it would drop it")
        for path, parts, want in self._skipped:
            m = _module_at(layer, parts)
            if m is None or (want is not None and type(m) is not want):
                problems.append(f"layers.{i}.{path} is {type(m).__module__}.{type(m).__name__} (a wrapper or a "
                                f"replacement, e.g. peft's modules_to_save or target_parameters), not transformers' "
                                f"{want.__name__ if want else 'module'}: the fused kernels read its parameters and "
                                "would skip it")
                continue
            skipped, captures = _attachments(m)
            problems += [f"layers.{i}.{path} has {s}" for s in skipped]
            for key in captures:
                if capturing and key in capturing:
                    problems.append(f"output_{key} records the output of layers.{i}.{path}, whose forward the "
                                    "fused layer does not call: unpatch (handle.unpatch()) to get it")
        if problems:
            raise ValueError("patch_transformers cannot honour what is attached to this model; the fused layer would "
                             "skip it:\n  " + "\n  ".join(problems[:20]))

    def _needs_grad(self, layer: nn.Module, hidden_states: Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        return hidden_states.requires_grad or any(p.requires_grad for p in layer.parameters())

    def _forward_for(self, i: int, layer: nn.Module) -> Callable:
        original = type(layer).forward  # the class's forward (with transformers' checkpointing wrapper)

        def forward(hidden_states: Tensor, per_layer_input: Tensor | None = None, shared_kv_states=None,
                    position_embeddings: tuple[Tensor, Tensor] | None = None, attention_mask=None,
                    position_ids: Tensor | None = None, cache=None, **kwargs: Any) -> Tensor:
            if "past_key_values" in kwargs:  # transformers' deprecated name, as its own forward accepts it
                cache = kwargs.pop("past_key_values")
            if self._needs_grad(layer, hidden_states):
                self.stats["grad_fallbacks"] += 1
                if not self._warned:
                    self._warned = True
                    warnings.warn("patch_transformers: autograd needs this forward (grad enabled and a parameter or "
                                  "input requires grad) and the fused kernels have no backward, so the decoder "
                                  "layers run transformers' own forward; run under torch.no_grad() or "
                                  "torch.inference_mode() for the fused path (said once; handle.stats counts it)",
                                  stacklevel=2)
                return original(layer, hidden_states, per_layer_input, shared_kv_states, position_embeddings,
                                attention_mask, position_ids, **{self.cache_arg: cache}, **kwargs)
            if per_layer_input is not None:
                raise ValueError("patch_transformers: per_layer_input was given, but this model has no per-layer "
                                 "inputs (the patch refuses models that do)")
            from transformers.utils.output_capturing import _active_collector

            self.check_attachments(layer, i, _active_collector.get())
            return self._run(i, layer, hidden_states, shared_kv_states, position_embeddings, attention_mask,
                             position_ids, cache, kwargs)

        return forward

    def _run(self, i: int, layer: nn.Module, hidden_states: Tensor, shared_kv_states, position_embeddings,
             attention_mask, position_ids, cache, kwargs: dict) -> Tensor:
        """One layer through gemma4lab's program: ``run_layer`` with transformers' cache and attention between
        its halves."""
        self.stats["fused_calls"] += 1
        b, t, hs = hidden_states.shape
        cos, sin = position_embeddings
        cos = cos.expand(b, t, -1).reshape(b * t, -1)
        sin = sin.expand(b, t, -1).reshape(b * t, -1)
        attn = layer.self_attn
        kwargs = {"position_ids": position_ids, **kwargs}

        def attend(_: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            q4, k4, v4 = (x.view(b, t, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
            if cache is not None:
                k4, v4 = cache.update(k4, v4, attn.layer_idx, kwargs=kwargs)
            if attn.store_full_length_kv:  # the last layer of each type hands its keys to assistant models
                shared_kv_states[attn.layer_type] = k4, v4
            interface = self._hf.ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                                       self._hf.eager_attention_forward)
            o, _ = interface(attn, q4, k4, v4, attention_mask,
                             dropout=attn.attention_dropout if attn.training else 0.0, scaling=attn.scaling,
                             sliding_window=attn.sliding_window, **kwargs)
            return o.reshape(b * t, q.shape[1], q.shape[2])

        s = Stream(hidden_states.reshape(b * t, hs))
        out = run_layer(self._view, i, s, {attn.is_sliding: (cos, sin)}, attend, self.layer_fusion)
        return out.view(b, t, hs)

    # ---- patch / unpatch ------------------------------------------------------------------------------------------
    def _apply(self) -> None:
        for i, layer in enumerate(self._layers):
            self.check_attachments(layer, i, patching=True)
        if self.attention == "triton":
            register_attention()
            self._attn_before = self.text.config._attn_implementation
            self.text.config._attn_implementation = ATTENTION_NAME
        for i, layer in enumerate(self._layers):
            fwd = self._forward_for(i, layer)
            fwd.gemma4lab_patch = self
            layer.forward = fwd
            self._forwards.append(fwd)
        LIVE.add(self)
        self.patched = True

    def unpatch(self) -> None:
        """Restore every layer's own forward (and the attention implementation). Raises, changing nothing, if
        something replaced a patched forward since."""
        if not self.patched:
            return
        moved = [i for i, (layer, fwd) in enumerate(zip(self._layers, self._forwards))
                 if layer.__dict__.get("forward") is not fwd]
        if moved:
            raise ValueError(f"layers {moved} no longer hold the patched forward (something replaced it after "
                             "patch_transformers); not restoring over it")
        if self._route is not None:
            from gemma4lab.runtime.hf_pcg import detach

            detach(self._route)  # the runner stays in handle.runner (its stats), no longer routed to
            self._route = None
        for layer in self._layers:
            del layer.__dict__["forward"]
        if self.attention == "triton":
            self.text.config._attn_implementation = self._attn_before
        self._forwards.clear()
        LIVE.discard(self)
        self.patched = False

    def __enter__(self) -> TransformersPatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        state = "patched" if self.patched else "unpatched"
        return (f"<TransformersPatch {state}: {len(self._layers)} layers, fusion {self.layer_fusion.names}, "
                f"attention {self.attention!r}>")


def patch_transformers(model: nn.Module, fusion: Fusion | str = "all", *, attention: str = "auto",
                       pcg: bool | dict[str, Any] = False) -> TransformersPatch:
    """Route a transformers Gemma 4 model's text decoder layers through gemma4lab's fused kernels, in place.

    ``fusion``: a :class:`gemma4lab.Fusion` or ``"all"`` / ``"none"`` / ``"published"`` (``next_norm`` never
    applies per layer; see the module docstring). ``attention``: ``"triton"`` (gemma4lab's attention kernel through
    transformers' ``AttentionInterface``), ``"transformers"`` (keep the configured implementation) or ``"auto"``
    (``"triton"`` when the model is on CUDA). ``pcg``: also route prefill calls (``model(...)`` and the first step
    of ``generate``) through a :class:`gemma4lab.PiecewiseCudaGraphRunner` over the patched decoder (True, or the
    runner's keyword arguments: ``buckets``, ``max_tokens``, ...; see :mod:`gemma4lab.runtime.hf_pcg`); the runner
    is ``handle.runner``. Returns a :class:`TransformersPatch`; ``handle.unpatch()`` or a ``with`` block restores the
    original forwards. Refuses, changing nothing, what it cannot run faithfully.
    """
    fusion = Fusion.parse(fusion)
    if attention not in ("auto", "triton", "transformers"):
        raise ValueError(f"attention must be 'auto', 'triton' or 'transformers', got {attention!r}")
    text = _text_model(model)
    for layer in getattr(text, "layers", []):
        other = getattr(layer.__dict__.get("forward"), "gemma4lab_patch", None)
        if other is not None:
            raise ValueError(f"this model is already patched ({other!r}); unpatch it first")
    cfg = _check_layout(text)
    if attention == "auto":
        attention = "triton" if text.embed_tokens.weight.is_cuda else "transformers"
    if not isinstance(pcg, (bool, dict)):
        raise TypeError(f"pcg must be True/False or a dict of PiecewiseCudaGraphRunner arguments, got {pcg!r}")
    handle = TransformersPatch(model, text, cfg, fusion, attention)
    handle._apply()
    if pcg is not False:
        from gemma4lab.runtime.hf_pcg import attach

        try:
            handle.runner, handle._route = attach(handle, **(pcg if isinstance(pcg, dict) else {}))
        except BaseException:
            handle.unpatch()  # never half-patched
            raise
    return handle


# ---- gemma4lab's attention in transformers' AttentionInterface ------------------------------------------------------
def register_attention(name: str = ATTENTION_NAME) -> str:
    """Register :func:`triton_attention` with transformers (``AttentionInterface``, and SDPA's boolean masks in
    ``AttentionMaskInterface``), so ``attn_implementation=name`` selects it; returns ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(name, triton_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return name


def kernel_layout(mask: Tensor | None, b: int, t: int, s: int, window: int | None,
                  device: torch.device) -> tuple[Tensor | None, Tensor | None, int, int | None] | None:
    """transformers' SDPA mask for ``b`` rows of ``t`` queries over ``s`` keys (the queries being the last ``t``)
    as ``gemma_prefill_attention``'s arguments ``(key_end, cu_seqlens_k, keys used, window)``, or None where the
    kernel cannot express it: each query row must see one run of keys that starts where the window (sliding layers)
    or the row's prompt (full layers) starts. One host read of the check."""
    if mask is None:  # transformers skipped it, and SDPA then applies no window:
        if t > 1:  # plain causal over the first t keys (SDPA's is_causal; a static cache's prefill)
            return None, None, t, None
        ends = (torch.arange(1, b + 1, device=device) * s).to(torch.int32)  # one query sees every key
        return ends, (torch.arange(b + 1, device=device) * s).to(torch.int32), s, None
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != (t, s):
        return None
    m = mask[:, 0].expand(b, t, s)
    first = m.to(torch.uint8).argmax(-1)
    last = s - 1 - m.flip(-1).to(torch.uint8).argmax(-1)
    rows = torch.arange(t, device=device) + (s - t)  # each query's own key row
    lo = (rows - window + 1).clamp(min=0) if window else torch.zeros_like(rows)
    ok = m.any(-1) & (m.sum(-1) == last - first + 1) & (first == lo)
    if not bool(ok.all()):
        return None
    key_end = (last + 1 + torch.arange(b, device=device)[:, None] * s).to(torch.int32).reshape(-1)
    cu_k = None if s == t else (torch.arange(b + 1, device=device) * s).to(torch.int32)
    return key_end, cu_k, s, window


#: The last masks' layouts: transformers builds one mask per layer type and forward and hands the same tensor to
#: every layer of that type, so the check (and its host read) runs once per mask, not once per layer.
_LAYOUTS: dict[int, tuple] = {}


def _cached_layout(mask: Tensor | None, b: int, t: int, s: int, window: int | None, device: torch.device):
    if mask is None:
        return kernel_layout(None, b, t, s, window, device)
    key = (b, t, s, window, mask.data_ptr(), mask._version)
    hit = _LAYOUTS.get(id(mask))
    if hit is not None and hit[0]() is mask and hit[1] == key:
        return hit[2]
    layout = kernel_layout(mask, b, t, s, window, device)
    if len(_LAYOUTS) >= 8:
        _LAYOUTS.clear()
    _LAYOUTS[id(mask)] = (weakref.ref(mask), key, layout)
    return layout


def triton_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None,
                     **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' attention-interface signature over ``gemma_prefill_attention``: ``query [B, Hq, T, D]``,
    ``key``/``value`` ``[B, Hkv, S, D]`` → ``[B, T, Hq, D]``. Hands to transformers' SDPA whatever the kernel does
    not compute (dropout, another scale, a soft cap, autograd, a mask it cannot express)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    why = None
    if dropout or (scaling is not None and scaling != 1.0) or kwargs.get("softcap") is not None:
        why = "dropout, scale or soft cap"
    elif torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value)):
        why = "autograd"
    elif kwargs.get("output_attentions"):
        why = "output_attentions"
    b, hq, t, d = query.shape
    s = key.shape[2]
    layout = None if why else _cached_layout(attention_mask, b, t, s, sliding_window, query.device)
    if layout is None:
        ATTENTION_STATS[f"sdpa: {why or 'mask'}"] += 1
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    from gemma4lab.kernels import gemma_prefill_attention

    key_end, cu_k, used, window = layout
    q = query.transpose(1, 2).reshape(b * t, hq, d)
    k, v = (x[:, :, :used].transpose(1, 2).reshape(b * used, x.shape[1], d) for x in (key, value))
    cu = (torch.arange(b + 1, device=query.device) * t).to(torch.int32)
    ATTENTION_STATS["kernel"] += 1
    o = gemma_prefill_attention(q, k, v, cu, t, window=window, key_end=key_end, cu_seqlens_k=cu_k)
    return o.view(b, t, hq, d), None
