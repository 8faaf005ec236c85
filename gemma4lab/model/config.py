"""Typed Gemma 4 configuration.

Reads a Hugging Face ``config.json`` in both forms transformers has shipped (5.5-style ``global_head_dim`` /
``num_global_key_value_heads`` and the newer ``per_layer_config`` overrides) and names the presets used in this
repo. Anything the model does not implement is rejected here, naming the field, so that a wrong model is never
built silently.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass
class TextConfig:
    """The text decoder's shapes. Sliding layers use ``head_dim``/``num_key_value_heads``; full layers use the
    ``global_*`` fields (the reference keeps them as per-layer overrides)."""

    vocab_size: int = 262144
    hidden_size: int = 2816
    intermediate_size: int = 2112
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: int = 2
    attention_k_eq_v: bool = True
    layer_types: list[str] = field(default_factory=list)
    sliding_window: int = 1024
    rope_theta_sliding: float = 10000.0
    rope_theta_full: float = 1_000_000.0
    rope_type_full: str = "proportional"
    partial_rotary_factor_full: float = 0.25
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    enable_moe_block: bool = True
    num_experts: int = 128
    top_k_experts: int = 8
    moe_intermediate_size: int = 704
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: list[int] = field(default_factory=lambda: [1])
    use_bidirectional_attention: str | None = "vision"
    max_position_embeddings: int = 262144

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "global_head_dim", "sliding_window", "max_position_embeddings")
        if self.attention_k_eq_v:
            _positive(self, "num_global_key_value_heads")
        for name in ("head_dim", "global_head_dim"):
            if getattr(self, name) % 2:
                raise ValueError(f"{name}={getattr(self, name)} must be even (RoPE rotates pairs of dimensions)")
        for name in ("rms_norm_eps", "rope_theta_sliding", "rope_theta_full"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not 0 < self.partial_rotary_factor_full <= 1:
            raise ValueError(f"partial_rotary_factor_full must lie in (0, 1], got {self.partial_rotary_factor_full}")
        cap = self.final_logit_softcapping
        if cap is not None and (not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0):
            raise ValueError(f"final_logit_softcapping must be None or a number > 0, got {cap!r}")
        if self.enable_moe_block:
            _positive(self, "num_experts", "top_k_experts", "moe_intermediate_size")
        for name in ("pad_token_id", "bos_token_id"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 <= v < self.vocab_size:
                raise ValueError(f"{name}={v!r} must be a token id in [0, vocab_size={self.vocab_size})")
        if not self.layer_types:
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries, expected num_hidden_layers={self.num_hidden_layers}"
            )
        # The reference forces the last layer to full attention; so do we.
        self.layer_types = list(self.layer_types)
        self.layer_types[-1] = FULL
        for t in self.layer_types:
            if t not in (SLIDING, FULL):
                raise ValueError(f"layer_types entry {t!r} is not supported (expected {SLIDING!r} or {FULL!r})")
        if self.num_attention_heads % self.num_key_value_heads or self.num_attention_heads % self.kv_heads_full:
            raise ValueError("num_attention_heads must be a multiple of every layer's number of KV heads")
        if self.enable_moe_block and self.top_k_experts > self.num_experts:
            raise ValueError(f"top_k_experts={self.top_k_experts} exceeds num_experts={self.num_experts}")

    # ---- per-layer views -------------------------------------------------------------------------------------
    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    @property
    def kv_heads_full(self) -> int:
        return self.num_global_key_value_heads if self.attention_k_eq_v else self.num_key_value_heads

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else self.global_head_dim

    def layer_kv_heads(self, layer: int) -> int:
        return self.num_key_value_heads if self.is_sliding(layer) else self.kv_heads_full

    def layer_k_eq_v(self, layer: int) -> bool:
        """Full layers with ``attention_k_eq_v`` have no ``v_proj``: the raw K projection is reused as V."""
        return self.attention_k_eq_v and not self.is_sliding(layer)

    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5


@dataclass
class VisionConfig:
    """The vision tower (a new Gemma 4 encoder, not SigLIP)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    head_dim: int = 72
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10240
    rope_theta: float = 100.0
    rms_norm_eps: float = 1e-6
    standardize: bool = True

    def __post_init__(self) -> None:
        _positive(self, "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                  "patch_size", "pooling_kernel_size", "position_embedding_size")
        if self.head_dim % 4:
            raise ValueError(f"vision head_dim={self.head_dim} must be a multiple of 4 (2-D RoPE rotates pairs on two "
                             "axes)")
        if not isinstance(self.rms_norm_eps, (int, float)) or not math.isfinite(self.rms_norm_eps) or \
                self.rms_norm_eps <= 0:
            raise ValueError(f"vision rms_norm_eps must be a finite number > 0, got {self.rms_norm_eps!r}")


@dataclass
class Gemma4Config:
    """The multimodal model: a text decoder, an optional vision tower and the special token ids."""

    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig | None = field(default_factory=VisionConfig)
    image_token_id: int = 258880
    boi_token_id: int = 255999
    eoi_token_id: int = 258882
    video_token_id: int = 258884
    audio_token_id: int = 258881
    vision_soft_tokens_per_image: int = 280

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> Gemma4Config:
        """Named shapes: ``"26b-a4b"`` (the real model) and ``"tiny"`` (a CPU-sized model with every feature)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[name]()

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Gemma4Config:
        """Read ``config.json`` from a checkpoint directory (or the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"no config.json found at {path}")
        try:
            with open(file) as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from e
        return cls.from_hf_dict(d)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> Gemma4Config:
        """Build from a Hugging Face ``Gemma4Config`` dict (or a bare ``gemma4_text`` one). Anything that is not a
        Gemma 4 config — an empty dict, another model's ``config.json``, a missing ``text_config`` — is refused."""
        if not isinstance(d, dict):
            raise TypeError(f"a config must be a dict (parsed config.json), got {type(d).__name__}")
        kind = d.get("model_type")
        if kind not in ("gemma4", "gemma4_text"):
            raise ValueError(f"model_type={kind!r} is not a Gemma 4 config (expected 'gemma4' or 'gemma4_text'): "
                             "gemma4lab builds only Gemma 4")
        if kind == "gemma4_text":
            text_d, vision_d, top = d, None, {}
        else:
            if not isinstance(d.get("text_config"), dict):
                raise ValueError(f"a 'gemma4' config needs a text_config object, got {d.get('text_config')!r}")
            if d.get("vision_config") is not None and not isinstance(d["vision_config"], dict):
                raise ValueError(f"vision_config must be an object or null, got {d['vision_config']!r}")
            text_d, vision_d, top = d["text_config"], d.get("vision_config"), d
        if top.get("audio_config"):
            raise ValueError("audio_config is set: the audio tower (E2B/E4B) is not supported by gemma4lab")
        kw: dict[str, Any] = {}
        fields = _Fields(top, "config")
        for k in ("image_token_id", "boi_token_id", "eoi_token_id", "video_token_id", "audio_token_id",
                  "vision_soft_tokens_per_image"):
            v = fields.int(k, None)
            if v is not None:
                if v < 0:
                    raise ValueError(f"config field {k}={v} must be >= 0")
                kw[k] = v
        return cls(text=_text_from_hf(text_d), vision=_vision_from_hf(vision_d) if vision_d else None, **kw)

    def to_hf_dict(self) -> dict[str, Any]:
        """The equivalent Hugging Face config dict (5.16+ ``per_layer_config`` form), for tests and checkpoints."""
        t = self.text
        per_layer = {
            str(i): {"head_dim": t.global_head_dim, "num_key_value_heads": t.kv_heads_full}
            for i in range(t.num_hidden_layers)
            if not t.is_sliding(i)
        }
        text = {
            "model_type": "gemma4_text",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "per_layer_config": per_layer,
            "attention_k_eq_v": t.attention_k_eq_v,
            "layer_types": list(t.layer_types),
            "sliding_window": t.sliding_window,
            "rope_parameters": {
                SLIDING: {"rope_type": "default", "rope_theta": t.rope_theta_sliding},
                FULL: (
                    {"rope_type": "proportional", "rope_theta": t.rope_theta_full,
                     "partial_rotary_factor": t.partial_rotary_factor_full}
                    if t.rope_type_full == "proportional"
                    else {"rope_type": "default", "rope_theta": t.rope_theta_full}
                ),
            },
            "rms_norm_eps": t.rms_norm_eps,
            "final_logit_softcapping": t.final_logit_softcapping,
            "enable_moe_block": t.enable_moe_block,
            "num_experts": t.num_experts if t.enable_moe_block else None,
            "top_k_experts": t.top_k_experts if t.enable_moe_block else None,
            "moe_intermediate_size": t.moe_intermediate_size if t.enable_moe_block else None,
            "hidden_size_per_layer_input": 0,
            "num_kv_shared_layers": 0,
            "use_bidirectional_attention": t.use_bidirectional_attention,
            "hidden_activation": "gelu_pytorch_tanh",
            "pad_token_id": t.pad_token_id,
            "bos_token_id": t.bos_token_id,
            "eos_token_id": t.eos_token_id,
            "max_position_embeddings": t.max_position_embeddings,
            "tie_word_embeddings": True,
        }
        out: dict[str, Any] = {
            "model_type": "gemma4",
            "architectures": ["Gemma4ForConditionalGeneration"],
            "text_config": text,
            "vision_config": None,
            "audio_config": None,
            "image_token_id": self.image_token_id,
            "boi_token_id": self.boi_token_id,
            "eoi_token_id": self.eoi_token_id,
            "video_token_id": self.video_token_id,
            "audio_token_id": self.audio_token_id,
            "vision_soft_tokens_per_image": self.vision_soft_tokens_per_image,
            "tie_word_embeddings": True,
        }
        if self.vision is not None:
            v = self.vision
            out["vision_config"] = {
                "model_type": "gemma4_vision",
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_hidden_layers": v.num_hidden_layers,
                "num_attention_heads": v.num_attention_heads,
                "num_key_value_heads": v.num_attention_heads,
                "head_dim": v.head_dim,
                "patch_size": v.patch_size,
                "pooling_kernel_size": v.pooling_kernel_size,
                "position_embedding_size": v.position_embedding_size,
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
                "rms_norm_eps": v.rms_norm_eps,
                "standardize": v.standardize,
                "use_clipped_linears": False,
                "hidden_activation": "gelu_pytorch_tanh",
            }
        return out

    def replace_text(self, **changes: Any) -> Gemma4Config:
        """A copy with some text fields changed (e.g. fewer layers for a reduced-depth benchmark)."""
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = []
        return dataclasses.replace(self, text=dataclasses.replace(self.text, **changes))


# ---- Hugging Face dict parsing ------------------------------------------------------------------------------------


def _positive(cfg: Any, *names: str) -> None:
    """Each named field must be an int >= 1 (a 0 or a float would build a model that crashes or is silently wrong)."""
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{type(cfg).__name__}.{name} must be an int >= 1, got {v!r}")


def _require(d: dict[str, Any], key: str, allowed: tuple[Any, ...], what: str) -> None:
    if d.get(key, allowed[0]) not in allowed:
        raise ValueError(f"config field {what}.{key}={d.get(key)!r} is not supported (supported: {allowed})")


class _Fields:
    """Typed reads of one config section: a wrong type is a ``ValueError`` naming the field, never a crash later.
    A missing field (or ``None``, as transformers writes for unset optional fields) takes the default."""

    def __init__(self, d: dict[str, Any], what: str) -> None:
        self.d, self.what = d, what

    def _bad(self, key: str, want: str) -> ValueError:
        return ValueError(f"config field {self.what}.{key}={self.d.get(key)!r} must be {want}")

    def int(self, key: str, default: int | None) -> int | None:
        v = self.d.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._bad(key, "an integer")
        return v

    def num(self, key: str, default: float | None) -> float | None:
        v = self.d.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self._bad(key, "a number")
        return float(v)

    def flag(self, key: str, default: bool) -> bool:
        v = self.d.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self._bad(key, "true or false")
        return v

    def obj(self, key: str) -> dict[str, Any]:
        v = self.d.get(key)
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise self._bad(key, "an object")
        return v

    def ints(self, key: str, default: list[int]) -> list[int]:
        v = self.d.get(key)
        if v is None:
            return default
        v = [v] if isinstance(v, int) and not isinstance(v, bool) else v
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise self._bad(key, "an integer or a list of integers")
        return list(v)


def _text_from_hf(d: dict[str, Any]) -> TextConfig:
    _require(d, "hidden_size_per_layer_input", (0, None), "text_config")
    _require(d, "num_kv_shared_layers", (0, None), "text_config")
    _require(d, "use_double_wide_mlp", (False, None), "text_config")
    _require(d, "attention_bias", (False, None), "text_config")
    _require(d, "hidden_activation", ("gelu_pytorch_tanh",), "text_config")
    _require(d, "use_bidirectional_attention", ("vision", None), "text_config")
    f = _Fields(d, "text_config")
    n_layers = f.int("num_hidden_layers", 30)
    if n_layers < 1:
        raise ValueError(f"text_config.num_hidden_layers must be an int >= 1, got {n_layers!r}")
    layer_types = d.get("layer_types") or []
    if not isinstance(layer_types, list):
        raise ValueError(f"text_config.layer_types must be a list, got {layer_types!r}")
    if not layer_types:
        layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n_layers)]
    layer_types = list(layer_types)
    layer_types[-1] = FULL
    head_dim = f.int("head_dim", 256)
    kv = f.int("num_key_value_heads", 4)
    k_eq_v = f.flag("attention_k_eq_v", False)

    # Full-layer shapes: 5.5-style top-level fields, or 5.16+ per_layer_config overrides.
    per_layer = f.obj("per_layer_config")
    if per_layer:
        try:
            overrides = {int(k): v for k, v in per_layer.items()}
        except ValueError:
            raise ValueError(f"per_layer_config keys must be layer numbers, got {sorted(per_layer)}") from None
        full_ids = [i for i, t in enumerate(layer_types) if t == FULL]
        extra = [i for i in overrides if i not in full_ids]
        if extra:
            raise ValueError(f"per_layer_config overrides sliding layers {extra}: only full layers may differ")
        if not all(isinstance(v, dict) for v in overrides.values()):
            raise ValueError("per_layer_config entries must be objects")
        seen = {json.dumps(overrides.get(i, {}), sort_keys=True) for i in full_ids}
        if len(seen) > 1:
            raise ValueError("per_layer_config gives full layers different shapes: not supported")
        o = overrides.get(full_ids[0], {}) if full_ids else {}
        unknown = set(o) - {"head_dim", "num_key_value_heads"}
        if unknown:
            raise ValueError(f"per_layer_config fields {sorted(unknown)} are not supported")
        of = _Fields(o, "text_config.per_layer_config")
        global_head_dim = of.int("head_dim", head_dim)
        global_kv = of.int("num_key_value_heads", kv)
    else:
        global_head_dim = f.int("global_head_dim", 512)
        g = f.int("num_global_key_value_heads", None)
        global_kv = g if (g is not None and k_eq_v) else kv

    rope = f.obj("rope_parameters")
    rope_f = _Fields(rope, "text_config.rope_parameters")
    rs = rope_f.obj(SLIDING) or {"rope_type": "default", "rope_theta": 10000.0}
    rf = rope_f.obj(FULL) or {"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 0.25}
    if rs.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters.sliding_attention.rope_type={rs.get('rope_type')!r} is not supported")
    if rf.get("rope_type") not in ("default", "proportional"):
        raise ValueError(f"rope_parameters.full_attention.rope_type={rf.get('rope_type')!r} is not supported")
    for r in (rs, rf):
        if r.get("factor", 1.0) != 1.0:
            raise ValueError("rope_parameters.*.factor != 1 is not supported")
    fs, ff = _Fields(rs, f"rope_parameters.{SLIDING}"), _Fields(rf, f"rope_parameters.{FULL}")
    moe = f.flag("enable_moe_block", False)
    return TextConfig(
        vocab_size=f.int("vocab_size", 262144),
        hidden_size=f.int("hidden_size", 2304),
        intermediate_size=f.int("intermediate_size", 9216),
        num_hidden_layers=n_layers,
        num_attention_heads=f.int("num_attention_heads", 8),
        num_key_value_heads=kv,
        head_dim=head_dim,
        global_head_dim=global_head_dim,
        num_global_key_value_heads=global_kv,
        attention_k_eq_v=k_eq_v,
        layer_types=layer_types,
        sliding_window=f.int("sliding_window", 512),
        rope_theta_sliding=fs.num("rope_theta", 10000.0),
        rope_theta_full=ff.num("rope_theta", 1e6),
        rope_type_full=rf.get("rope_type", "proportional"),
        partial_rotary_factor_full=ff.num("partial_rotary_factor", 1.0),
        rms_norm_eps=f.num("rms_norm_eps", 1e-6),
        final_logit_softcapping=f.num("final_logit_softcapping", None),
        enable_moe_block=moe,
        num_experts=f.int("num_experts", 0) if moe else 0,
        top_k_experts=f.int("top_k_experts", 0) if moe else 0,
        moe_intermediate_size=f.int("moe_intermediate_size", 0) if moe else 0,
        pad_token_id=f.int("pad_token_id", 0),
        bos_token_id=f.int("bos_token_id", 2),
        eos_token_id=f.ints("eos_token_id", [1]),
        use_bidirectional_attention=d.get("use_bidirectional_attention"),
        max_position_embeddings=f.int("max_position_embeddings", 131072),
    )


def _vision_from_hf(d: dict[str, Any]) -> VisionConfig:
    _require(d, "use_clipped_linears", (False, None), "vision_config")
    _require(d, "attention_bias", (False, None), "vision_config")
    _require(d, "hidden_activation", ("gelu_pytorch_tanh",), "vision_config")
    f = _Fields(d, "vision_config")
    heads = f.int("num_attention_heads", 12)
    if f.int("num_key_value_heads", heads) != heads:
        raise ValueError("vision_config.num_key_value_heads != num_attention_heads is not supported")
    rope = _Fields(f.obj("rope_parameters"), "vision_config.rope_parameters")
    return VisionConfig(
        hidden_size=f.int("hidden_size", 768),
        intermediate_size=f.int("intermediate_size", 3072),
        num_hidden_layers=f.int("num_hidden_layers", 16),
        num_attention_heads=heads,
        head_dim=f.int("head_dim", 64),
        patch_size=f.int("patch_size", 16),
        pooling_kernel_size=f.int("pooling_kernel_size", 3),
        position_embedding_size=f.int("position_embedding_size", 10240),
        rope_theta=rope.num("rope_theta", 100.0),
        rms_norm_eps=f.num("rms_norm_eps", 1e-6),
        standardize=f.flag("standardize", False),
    )


# ---- presets ------------------------------------------------------------------------------------------------------


def _preset_26b_a4b() -> Gemma4Config:
    return Gemma4Config(text=TextConfig(), vision=VisionConfig())


def _preset_tiny() -> Gemma4Config:
    """Every feature of 26B-A4B at CPU size: MoE, K-as-V full layers with a wider head, proportional RoPE, a
    sliding window shorter than a typical test prompt, and a vision tower."""
    text = TextConfig(
        vocab_size=512,
        hidden_size=96,
        intermediate_size=80,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        global_head_dim=64,
        num_global_key_value_heads=1,
        sliding_window=16,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=48,
        max_position_embeddings=4096,
    )
    vision = VisionConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        head_dim=24,
        position_embedding_size=256,
    )
    # Token ids must fall inside the tiny vocabulary.
    return Gemma4Config(
        text=text, vision=vision, image_token_id=500, boi_token_id=501, eoi_token_id=502, video_token_id=503,
        audio_token_id=504, vision_soft_tokens_per_image=70,
    )


PRESETS = {"26b-a4b": _preset_26b_a4b, "tiny": _preset_tiny}
