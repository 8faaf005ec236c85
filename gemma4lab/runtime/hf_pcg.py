"""The piecewise CUDA graph prefill over transformers' own Gemma 4 (``patch_transformers(model, pcg=True)``).

The runner (``gemma4lab.runtime.pcg.PiecewiseCudaGraphRunner``) runs gemma4lab's decoder program over packed prompts;
here it runs that program over transformers' modules, through the same views the per-layer patch uses
(:mod:`gemma4lab.runtime.hf_patch`), so the buckets, the static buffers, the capture, chunked prefill of long
prompts and the eager fallback are the runner's, unchanged:

* :class:`_HFText` is gemma4lab's ``TextModel`` (embed, RoPE, the attention plan, the head) over transformers'
  ``Gemma4TextModel``: its embedding, rotary frequencies, norm and ``lm_head`` modules. The whole program runs, so
  the ``next_norm`` fusion applies here.
* :class:`_HFModel` is gemma4lab's ``Gemma4ForConditionalGeneration`` API (``pack_prompts``, ``embed_inputs``,
  ``prefill``: the runner's inputs and its eager fallback) over transformers' model; images go through transformers'
  vision tower (``get_image_features``).
* :class:`HFCacheFill` gives transformers' ``DynamicCache`` the two calls the attention between pieces makes on a KV
  cache (``fill``, and ``with_prefix`` for a chunk of a long prompt), so ``generate`` decodes from the cache the runner
  filled.
* The model's ``forward`` is replaced on the instance: a prefill-shaped call (token ids, an empty ``DynamicCache`` or
  none, no padding, default positions, nothing asked of the outputs but logits) goes to the runner; every other call
  (decode steps, padded batches, training) to transformers' forward, whose decoder layers are patched.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from torch import Tensor

from gemma4lab.attention import PackedBatch
from gemma4lab.attention.rule import Visibility
from gemma4lab.model.layers import rope_cos_sin
from gemma4lab.model.multimodal import Gemma4ForConditionalGeneration
from gemma4lab.model.text import TextModel
from gemma4lab.runtime.hf_patch import _base_model, _view_class


def _embed(self, input_ids: Tensor) -> Tensor:
    """transformers' scaled embedding (the scale rounded to the weight dtype, as ours), placeholders as padding."""
    if self.placeholder_ids.numel():
        is_placeholder = torch.isin(input_ids, self.placeholder_ids)
        input_ids = torch.where(is_placeholder, torch.full_like(input_ids, self.config.pad_token_id), input_ids)
    return self._m.embed_tokens(input_ids)


def _rope(self, positions: Tensor) -> dict[bool, tuple[Tensor, Tensor]]:
    rotary = self._m.rotary_emb
    return {True: rope_cos_sin(rotary.sliding_attention_inv_freq, positions),
            False: rope_cos_sin(rotary.full_attention_inv_freq, positions)}


def _logits(self, h: Tensor) -> Tensor:
    """transformers' ``lm_head`` (tied or not, adapted or not) and the soft cap."""
    out = self.owner.lm_head(h)
    cap = self.config.final_logit_softcapping
    return out if cap is None else torch.tanh(out / cap) * cap


_HFText = _view_class(TextModel, embed=_embed, rope=_rope, logits=_logits)


class EncodedImages:
    """Image soft tokens transformers' ``generate`` already ran the vision tower for (``mm_encoder_outputs``), passed
    where the runner takes ``pixel_values`` so that it does not run the tower again."""

    def __init__(self, features: Tensor) -> None:
        self.features = features


def _image_features(self, pixel_values: Tensor | EncodedImages, image_position_ids: Tensor, *,
                    tower: Any = None) -> Tensor:
    if tower is not None:  # the runner builds TowerGraphs for gemma4lab's tower only; transformers' runs its own
        raise TypeError("transformers' vision tower runs as transformers runs it: no gemma4lab tower graphs here")
    if isinstance(pixel_values, EncodedImages):
        return pixel_values.features
    if getattr(self.config, "vision", None) is None or not hasattr(self._m, "get_image_features"):
        raise ValueError("this model has no vision tower but pixel_values were given")
    from gemma4lab.model.multimodal import check_pixels

    check_pixels(pixel_values, image_position_ids, self.config.vision.position_embedding_size)
    out = self._m.get_image_features(pixel_values.to(self.device), image_position_ids.to(self.device),
                                     return_dict=True)
    return torch.cat(list(out.pooler_output), dim=0)


_HFModel = _view_class(Gemma4ForConditionalGeneration, language_model=property(lambda v: v.lm),
                       image_features=_image_features)


def runner_model(handle) -> Any:
    """gemma4lab's model API over the patched transformers model of ``handle`` (what the runner is built on)."""
    from gemma4lab.model.config import Gemma4Config

    hf, text, cfg = _base_model(handle.model), handle.text, handle.config
    rotary = text.rotary_emb
    for kind in ("sliding_attention", "full_attention"):
        scale = getattr(rotary, f"{kind}_attention_scaling", None)
        if scale != 1.0 or not isinstance(getattr(rotary, f"{kind}_inv_freq", None), Tensor):
            raise ValueError(f"pcg: transformers' rotary embedding for {kind} has attention_scaling={scale!r} or no "
                             "inv_freq buffer; the runner's RoPE tables need scale 1 and the frequencies")
    full = Gemma4Config.from_hf_dict(hf.config.to_dict())
    dev = text.embed_tokens.weight.device
    multimodal = hasattr(hf.model, "language_model")
    placeholders = [full.image_token_id, full.video_token_id, full.audio_token_id] if multimodal else []
    lm = _HFText(text, config=cfg, layers=handle._view.layers, fusion=handle.fusion, attn_backend="auto",
                 owner=hf, placeholder_ids=torch.tensor(placeholders, dtype=torch.long, device=dev))
    return _HFModel(hf.model, config=full, lm=lm)


class HFCacheFill:
    """transformers' ``DynamicCache`` behind the two calls gemma4lab's prefill attention makes on a KV cache: ``fill``
    (a pack of equal-length prompts, as transformers batches them: prompt b is cache row b) and ``with_prefix`` (a
    chunk of one long prompt reads the earlier chunks' keys back: all of them on full layers, the last
    ``window - 1`` that transformers' sliding layers keep)."""

    def __init__(self, cache, cfg) -> None:
        self.cache, self.cfg = cache, cfg

    def check_fits(self, batch: PackedBatch) -> None:
        if len(set(batch.seq_lens)) != 1 or len(set(batch.cached)) != 1:
            raise ValueError("a transformers cache holds a batch of equal-length prompts: got lengths "
                             f"{batch.seq_lens} after {batch.cached} cached tokens")
        if batch.cached[0] != self.cache.get_seq_length():
            raise ValueError(f"the rows continue {batch.cached[0]} cached tokens but transformers' cache holds "
                             f"{self.cache.get_seq_length()}")

    def fill(self, layer: int, k: Tensor, v: Tensor, batch: PackedBatch) -> None:
        b, t = len(batch.seq_lens), batch.seq_lens[0]
        k4, v4 = (x.view(b, t, x.shape[1], x.shape[2]).transpose(1, 2) for x in (k, v))
        self.cache.update(k4, v4, layer)

    def with_prefix(self, layer: int, k: Tensor, v: Tensor, batch: PackedBatch) -> tuple[Tensor, Tensor]:
        if not batch.chunked:
            return k, v
        if len(batch.seq_lens) != 1:
            raise ValueError("chunked prefill through a transformers cache takes one prompt")
        c = batch.cached[0]
        need = c - Visibility.for_layer(self.cfg, self.cfg.is_sliding(layer)).key_start(c)
        stored = self.cache.layers[layer]
        if stored.keys.shape[-2] < need:
            raise ValueError(f"layer {layer} of transformers' cache keeps {stored.keys.shape[-2]} keys; the chunk "
                             f"needs the last {need}")
        prefix = [x[0, :, x.shape[-2] - need:].transpose(0, 1) for x in (stored.keys, stored.values)]
        return torch.cat([prefix[0], k]), torch.cat([prefix[1], v])


#: Arguments of transformers' forward that a prefill through the runner leaves as they are by default.
_UNUSED = {"pixel_values_videos", "input_features", "input_features_mask", "video_position_ids", "num_frames_per_video",
           "inputs_embeds", "labels", "per_layer_inputs"}
_HANDLED = {"self", "input_ids", "pixel_values", "image_position_ids", "mm_token_type_ids", "attention_mask",
            "position_ids", "cache", "past_key_values", "use_cache", "logits_to_keep", "mm_encoder_outputs", "kwargs"}


class PrefillRoute:
    """The model's instance ``forward``: prefill-shaped calls through the runner, the rest to transformers."""

    def __init__(self, handle, runner) -> None:
        self.handle, self.runner = handle, runner
        self.model = _base_model(handle.model)
        self.image_token_id = runner.model.config.image_token_id
        self.original = type(self.model).forward
        self.signature = inspect.signature(self.original)
        # generate reads the forward's parameters (which inputs it may pass on): the route shows transformers' own
        self.__signature__ = self.signature.replace(parameters=list(self.signature.parameters.values())[1:])
        self.stats = runner.stats
        self.stats["transformers_calls"] = 0

    def why_not(self, a: dict[str, Any]) -> str | None:
        """None when the runner can take this call, else why not."""
        ids = a.get("input_ids")
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            return "no [batch, tokens] input_ids"
        cache = a.get(self.handle.cache_arg)
        if cache is not None and (type(cache).__name__ != "DynamicCache" or cache.get_seq_length() != 0):
            return "a cache that is not an empty DynamicCache (a decode step, or another cache class)"
        for name in _UNUSED:
            v = a.get(name)
            if v is not None and not (isinstance(v, (dict, list, tuple)) and not v):  # generate passes {} for some
                return f"{name} given"
        encoded = a.get("mm_encoder_outputs") or {}
        if set(encoded) - {"image"} or (encoded and a.get("pixel_values") is not None):
            return f"mm_encoder_outputs {sorted(encoded)}"
        extra = [k for k, v in a.get("kwargs", {}).items() if k != "return_dict" and v is not None and v is not False]
        if extra:
            return f"arguments {sorted(extra)}"
        if set(a) - _HANDLED - _UNUSED:
            return f"arguments {sorted(set(a) - _HANDLED - _UNUSED)}"
        if self.model.training or (torch.is_grad_enabled() and any(
                p.requires_grad for p in self.handle.text.parameters())):
            return "autograd"
        mask = a.get("attention_mask")
        if isinstance(mask, Tensor) and not bool(mask.all()):
            return "padding in attention_mask"
        if mask is not None and not isinstance(mask, Tensor):
            return "a prepared attention mask"
        pos = a.get("position_ids")
        if pos is not None and not torch.equal(pos, torch.arange(ids.shape[1], device=pos.device).expand_as(pos)):
            return "position_ids other than 0..T-1"
        if not isinstance(a.get("logits_to_keep", 0), int):
            return "logits_to_keep as a tensor"
        mm = a.get("mm_token_type_ids")
        if mm is not None and not torch.equal(mm.to(ids.device) == 1, ids == self.image_token_id):
            return "mm_token_type_ids that mark other tokens than the image soft tokens"
        if self._attached():
            return "hooks on the decoder, which the per-layer patch honours or refuses"
        return None

    def _attached(self) -> bool:
        """Something is attached to a module the runner does not call as transformers would (the decoder layers, the
        modules they skip, the text model, its rotary embedding and final norm), or an output is asked of them in
        the config: such calls take transformers' forward, where each layer's hooks fire and the per-layer checks
        apply. transformers' own output-capturing hooks count only while their output is asked for."""
        from gemma4lab.runtime.hf_patch import _attachments, _global_hooks, _module_at, _plain

        text = self.handle.text
        if _global_hooks() or any(getattr(text.config, f"output_{k}", False)
                                  for k in ("hidden_states", "attentions", "router_logits")):
            return True
        for m in (self.model.model, text, text.rotary_emb, text.norm, *text.layers):
            skipped, _ = _attachments(m)
            if [x for x in skipped if x != "an instance-level forward replacement" or m not in text.layers]:
                return True
        for layer in text.layers:
            for _, parts, want in self.handle._skipped:
                m = _module_at(layer, parts)
                if not _plain(m, want) and (m is None or (want is not None and type(m) is not want)
                                            or _attachments(m)[0]):
                    return True
        return False

    def __call__(self, *args: Any, **kwargs: Any):
        bound = self.signature.bind(self.model, *args, **kwargs)
        a = dict(bound.arguments)
        why = self.why_not(a)
        if why is not None:
            self.stats["transformers_calls"] += 1
            return self.original(self.model, *args, **kwargs)
        from transformers.cache_utils import DynamicCache

        ids = a["input_ids"]
        b, t = ids.shape
        use_cache = a.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.handle.text.config, "use_cache", True)
        cache = a.get(self.handle.cache_arg)
        if cache is None and use_cache:
            cache = DynamicCache(config=self.handle.text.config)
        mm = a.get("mm_token_type_ids")
        keep = a.get("logits_to_keep", 0)  # 0: every token's logits; k: the last k (generate asks for 1)
        pixels = a.get("pixel_values")
        encoded = (a.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:  # generate ran the vision tower already (as transformers' forward reads it)
            pixels = EncodedImages(torch.cat(list(encoded.pooler_output), dim=0))
        logits = self.runner.prefill(list(ids), pixels, a.get("image_position_ids"),
                                     list(mm) if mm is not None else None, all_logits=keep != 1,
                                     cache=HFCacheFill(cache, self.handle.config) if cache is not None else None)
        logits = logits.view(b, t if keep != 1 else 1, -1)
        if keep > 1:
            logits = logits[:, -keep:]
        out_cls = sys.modules[type(self.model).__module__].Gemma4CausalLMOutputWithPast
        out = out_cls(logits=logits, **{self.handle.cache_arg: cache})
        return out if a.get("kwargs", {}).get("return_dict", True) else out.to_tuple()


def attach(handle, **runner_kwargs: Any):
    """Build the runner over ``handle``'s patched model and route its prefill calls through it; returns the
    runner. ``handle.unpatch()`` removes the route with the layer patches."""
    from gemma4lab.runtime.pcg import PiecewiseCudaGraphRunner

    shim = runner_model(handle)
    runner = PiecewiseCudaGraphRunner(shim, **runner_kwargs)
    route = PrefillRoute(handle, runner)
    model = route.model
    if "forward" in model.__dict__:
        raise ValueError("pcg: the model already has an instance-level forward (another patch, or accelerate's "
                         "hooks); routing prefill over it would drop it")
    model.forward = route
    return runner, route


def detach(route) -> None:
    model = route.model
    if model.__dict__.get("forward") is not route:
        raise ValueError("pcg: the model's forward is no longer the prefill route (something replaced it)")
    del model.__dict__["forward"]


__all__ = ["HFCacheFill", "PrefillRoute", "attach", "detach", "runner_model"]
