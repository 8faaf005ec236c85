"""Fused Triton kernels for Gemma 4 (26B-A4B), one file per op, each a PyTorch op in the ``gemma4lab`` namespace.

Every kernel reads its inputs once, upcasts to fp32, does all its math in fp32 and rounds once when it stores
(so in bf16 it differs from the unfused Hugging Face model, which rounds after each op, by rounding only). Each
module holds the ``@triton.jit`` kernel, its registration as ``torch.ops.gemma4lab.<op>``, a checked Python
wrapper ``gemma_<op>`` and a plain-torch ``gemma_<op>_ref`` twin with the same fp32 math.

Dispatch lives in the registration (``_common.register``); ``kernel_backend(t)`` tells which one a call takes:

* CUDA tensors -> the compiled Triton kernel (``"triton"``);
* ``TRITON_INTERPRET=1`` set *before* ``gemma4lab.kernels`` is imported (Triton reads it when the kernels are
  decorated) -> the Triton kernel under Triton's CPU interpreter (``"triton-interpreter"``; ``INTERPRET`` is True);
* any other CPU tensor -> the ``_ref`` function (``"torch-reference"``), so the model runs on any CPU.

Conventions: activations are 2-D ``[tokens, hidden]`` row views (any row stride, contiguous last dim) in float32,
float16 or bfloat16, all of one dtype and device; weights are 1-D and may be float32 or the activation dtype;
per-layer scalars are one-element *device* tensors read inside the kernel so captured CUDA graphs stay valid. The
wrappers check shapes, dtypes, devices and strides from metadata (no host sync, safe in graph capture and under
torch.compile), return empty results for zero tokens without a launch, take ``out=`` buffers where a kernel has
outputs of the activations' shape, and ``config=`` (each family's launch-setting type) to override the heuristic in
tuning sweeps.

``with dependent_launch():`` launches every kernel with programmatic dependent launch on Hopper (each waits at its
top for the previous kernel, then lets the next one launch; the dense GEMM asks L2 for its first weight tiles
before it waits). The graph runners capture with it wherever it is supported (``dependent_launch_supported``):
measured on the H200, bit-identical and 3–6 % faster decode steps (``bench-decode --launch-ab``).
"""

from ._common import (
    INTERPRET,
    RowConfig,
    dependent_launch,
    dependent_launch_setting,
    dependent_launch_supported,
    kernel_backend,
    row_config,
)
from .decode_attention import DecodeConfig, decode_config, gemma_decode_attention, gemma_decode_attention_ref
from .dense_gemm import DENSE_MAX_ROWS, DenseConfig, dense_config, gemma_dense_gemm, gemma_dense_gemm_ref
from .dual_rmsnorm import (
    gemma_dual_rmsnorm_residual_scalar,
    gemma_dual_rmsnorm_residual_scalar_next_norm,
    gemma_dual_rmsnorm_residual_scalar_next_norm_ref,
    gemma_dual_rmsnorm_residual_scalar_ref,
)
from .gelu_tanh_mul import (
    ElementwiseConfig,
    elementwise_config,
    gemma_gelu_tanh_and_mul,
    gemma_gelu_tanh_and_mul_ref,
    gemma_gelu_tanh_mul,
    gemma_gelu_tanh_mul_ref,
)
from .moe_combine import CombineConfig, combine_config, gemma_moe_combine, gemma_moe_combine_ref
from .moe_gemm import (
    ACT_QUANT_K,
    MOE_SWEEP,
    MoeConfig,
    gemma_moe_gemm,
    gemma_moe_gemm_ref,
    moe_config,
    quantize_act_e4m3,
)
from .moe_route import gemma_moe_route, gemma_moe_route_ref
from .post_attention_block import (
    gemma_norm_residual_norm,
    gemma_norm_residual_norm_ref,
    gemma_post_attention_block,
    gemma_post_attention_block_ref,
)
from .prefill_attention import (
    AttentionConfig,
    attention_config,
    attention_configs,
    gemma_prefill_attention,
    gemma_prefill_attention_ref,
)
from .qkv_norm_rope import HeadConfig, gemma_qkv_norm_rope_, gemma_qkv_norm_rope_ref_, head_config
from .rmsnorm_residual_scalar import gemma_rmsnorm_residual_scalar, gemma_rmsnorm_residual_scalar_ref
from .router_topk import RouterConfig, gemma_router_topk, gemma_router_topk_ref, router_config

#: The registered ops, ``torch.ops.gemma4lab.<name>``: one per kernel.
OPS = ("rmsnorm_residual_scalar", "dual_rmsnorm_residual_scalar", "dual_rmsnorm_residual_scalar_next_norm",
       "post_attention_block", "norm_residual_norm", "qkv_norm_rope_", "router_topk", "gelu_tanh_and_mul",
       "moe_route", "moe_gemm", "moe_combine", "prefill_attention", "decode_attention", "dense_gemm")

__all__ = [
    "DENSE_MAX_ROWS",
    "INTERPRET",
    "MOE_SWEEP",
    "OPS",
    "AttentionConfig",
    "CombineConfig",
    "DecodeConfig",
    "DenseConfig",
    "ElementwiseConfig",
    "HeadConfig",
    "MoeConfig",
    "RouterConfig",
    "RowConfig",
    "attention_config",
    "attention_configs",
    "combine_config",
    "decode_config",
    "dense_config",
    "elementwise_config",
    "gemma_decode_attention",
    "gemma_decode_attention_ref",
    "gemma_dense_gemm",
    "gemma_dense_gemm_ref",
    "gemma_dual_rmsnorm_residual_scalar",
    "gemma_dual_rmsnorm_residual_scalar_next_norm",
    "gemma_dual_rmsnorm_residual_scalar_next_norm_ref",
    "gemma_dual_rmsnorm_residual_scalar_ref",
    "gemma_gelu_tanh_and_mul",
    "gemma_gelu_tanh_and_mul_ref",
    "gemma_gelu_tanh_mul",
    "gemma_gelu_tanh_mul_ref",
    "gemma_moe_combine",
    "gemma_moe_combine_ref",
    "gemma_moe_gemm",
    "gemma_moe_gemm_ref",
    "gemma_moe_route",
    "gemma_moe_route_ref",
    "gemma_norm_residual_norm",
    "gemma_norm_residual_norm_ref",
    "gemma_post_attention_block",
    "gemma_post_attention_block_ref",
    "gemma_prefill_attention",
    "gemma_prefill_attention_ref",
    "gemma_qkv_norm_rope_",
    "gemma_qkv_norm_rope_ref_",
    "gemma_rmsnorm_residual_scalar",
    "gemma_rmsnorm_residual_scalar_ref",
    "gemma_router_topk",
    "gemma_router_topk_ref",
    "head_config",
    "dependent_launch",
    "dependent_launch_setting",
    "dependent_launch_supported",
    "kernel_backend",
    "moe_config",
    "quantize_act_e4m3",
    "ACT_QUANT_K",
    "router_config",
    "row_config",
]
