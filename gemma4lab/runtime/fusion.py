"""Which fused kernels the decoder uses. Each switch replaces one stretch of unfused PyTorch ops with one kernel."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Fusion:
    """Per-kernel switches; ``Fusion()`` is the unfused reference path, ``Fusion.all()`` everything.

    * ``qkv_norm_rope``: per-head q/k/v RMSNorm + RoPE in place on the projections.
    * ``post_attention``: residual + post-attention norm, and from the same read the three FFN inputs
      (dense-MLP norm, experts norm, router input).
    * ``router``: softmax → top-k → renormalise → × per-expert scale.
    * ``gelu``: ``gelu_tanh(gate) * up`` for the dense MLP and the experts.
    * ``epilogue``: the MoE epilogue ``(rms(rms(d)·w1 + rms(m)·w2)·w3 + residual)·scalar`` (dual-norm kernel; the
      single-norm kernel on dense layers).
    * ``experts``: the MoE block in four kernels: ``moe_route`` (offsets and sorted slots in one launch), the
      streaming ``moe_gemm`` twice (weights read once; the token gather and the GELU in its operand loads) for
      prompts up to ``Experts.MOE_GEMM_MAX_TOKENS`` tokens (the library grouped GEMM above), ``moe_combine``.
    * ``dense``: projections that share an input run as one GEMM: at up to ``kernels.dense_gemm.DENSE_MAX_ROWS``
      rows (decode, short prompts) through ``dense_gemm`` (q/k/v in one launch, gate/up in one, o, down and the
      tied head one each); above, one library GEMM over the packed q/k/v and gate/up weights
      (``gemma4lab.model.packing``), in the decoder and the vision tower.
    * ``next_norm``: the epilogue also writes the next layer's input norm (and, after the last layer, the final
      norm), so the residual stream is read once across the layer boundary. Needs ``epilogue``.
    * ``branches``: not a kernel but a schedule: on a CUDA device the dense MLP runs on a second stream beside the
      router and the experts (two branches of the captured graph; the same kernels, so the same bits). Each branch's
      launches pay a ramp and a tail; side by side, one branch streams while the other starts or drains.
    """

    qkv_norm_rope: bool = False
    post_attention: bool = False
    router: bool = False
    gelu: bool = False
    epilogue: bool = False
    next_norm: bool = False
    experts: bool = False
    dense: bool = False
    branches: bool = False

    def __post_init__(self) -> None:
        if self.next_norm and not self.epilogue:
            raise ValueError("Fusion(next_norm=True) needs epilogue=True: the next norm rides on the epilogue kernel")

    @classmethod
    def all(cls) -> Fusion:
        return cls(**{f.name: True for f in fields(cls)})

    @classmethod
    def parse(cls, fusion: Fusion | str) -> Fusion:
        """A ``Fusion``, or one named ``"none"`` / ``"all"`` / ``"published"``."""
        if isinstance(fusion, str):
            if fusion not in ("none", "all", "published"):
                raise ValueError(f"fusion must be a Fusion or one of 'none', 'all', 'published', got {fusion!r}")
            fusion = getattr(cls, fusion)()
        if not isinstance(fusion, Fusion):
            raise TypeError(f"fusion must be a gemma4lab.Fusion, got {type(fusion).__name__}")
        return fusion

    @classmethod
    def none(cls) -> Fusion:
        return cls()

    @classmethod
    def published(cls) -> Fusion:
        """What the sglang PR shipped: the two norm + residual + scalar kernels only."""
        return cls(epilogue=True)

    @property
    def names(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name)]
