"""Fused Triton kernels for Gemma 4 (26B-A4B) prefill.

Every kernel reads its inputs once, upcasts to fp32, does all its math in fp32 and rounds once when it stores
(so in bf16 it differs from the unfused Hugging Face model, which rounds after each op, by rounding only). Each
module holds the ``@triton.jit`` kernel, a checked Python wrapper and a plain-torch ``<name>_ref`` twin with the
same fp32 math.

Dispatch rule (``kernel_backend(t)`` tells which one a call takes):

* CUDA tensors -> the compiled Triton kernel (``"triton"``);
* ``TRITON_INTERPRET=1`` set *before* ``gemma4lab.kernels`` is imported (Triton reads it when the kernels are
  decorated) -> the Triton kernel under Triton's CPU interpreter (``"triton-interpreter"``; ``INTERPRET`` is True);
* any other CPU tensor -> the ``_ref`` function (``"torch-reference"``), so the model runs on any CPU.

Conventions: activations are 2-D ``[tokens, hidden]`` row views (any row stride, contiguous last dim) in float32,
float16 or bfloat16, all of one dtype and device; weights are 1-D and may be float32 or the activation dtype;
per-layer scalars are one-element *device* tensors read inside the kernel so captured CUDA graphs stay valid. The
wrappers check shapes, dtypes, devices and strides from metadata only (no host sync, safe in graph capture), return
empty results for zero tokens without a launch, and take ``out=`` buffers (static buffers for CUDA graphs) and
``config=LaunchConfig(...)`` (to override the launch heuristic in tuning sweeps).
"""

from ._common import INTERPRET, LaunchConfig, RowConfig, kernel_backend
from .attention import AttentionConfig, gemma_prefill_attention, gemma_prefill_attention_ref, key_end_for_blocks
from .decode_attention import gemma_decode_attention, gemma_decode_attention_ref
from .dual_rmsnorm import gemma_dual_rmsnorm_residual_scalar, gemma_dual_rmsnorm_residual_scalar_ref
from .dual_rmsnorm_next_norm import (
                                     gemma_dual_rmsnorm_residual_scalar_next_norm,
                                     gemma_dual_rmsnorm_residual_scalar_next_norm_ref,
)
from .gelu_and_mul import gelu_tanh_and_mul, gelu_tanh_and_mul_ref, gelu_tanh_mul, gelu_tanh_mul_ref
from .moe_gemm import moe_combine, moe_combine_ref, moe_gemm, moe_gemm_ref
from .post_attention_block import gemma_post_attention_block, gemma_post_attention_block_ref
from .qkv_norm_rope import gemma_qkv_norm_rope_, gemma_qkv_norm_rope_ref_
from .rmsnorm_residual_scalar import gemma_rmsnorm_residual_scalar, gemma_rmsnorm_residual_scalar_ref
from .router_topk import gemma_router_topk, gemma_router_topk_ref

__all__ = [
    "AttentionConfig",
    "INTERPRET",
    "LaunchConfig",
    "RowConfig",
    "gelu_tanh_and_mul",
    "gelu_tanh_and_mul_ref",
    "gelu_tanh_mul",
    "gelu_tanh_mul_ref",
    "gemma_decode_attention",
    "gemma_decode_attention_ref",
    "gemma_dual_rmsnorm_residual_scalar",
    "gemma_dual_rmsnorm_residual_scalar_next_norm",
    "gemma_dual_rmsnorm_residual_scalar_next_norm_ref",
    "gemma_dual_rmsnorm_residual_scalar_ref",
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
    "kernel_backend",
    "key_end_for_blocks",
    "moe_combine",
    "moe_combine_ref",
    "moe_gemm",
    "moe_gemm_ref",
]


def _count_as_one_launch(fn):
    """On CPU, wrap a kernel call in a profiler range so ``gemma4lab.profiling`` counts it as one launch.

    Under Triton's interpreter (or the torch reference) a fused kernel runs as many tensor ops; on a GPU it is one
    launch, and the profiler counts real kernels there, so CUDA calls pass straight through.
    """
    import functools

    import torch

    name = f"gemma4lab::{fn.__name__}"

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.device.type != "cuda":
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


for _name in [n for n in __all__ if not n.endswith("_ref") and not n.endswith("_ref_") and n not in
              ("AttentionConfig", "INTERPRET", "LaunchConfig", "RowConfig", "kernel_backend", "key_end_for_blocks")]:
    globals()[_name] = _count_as_one_launch(globals()[_name])
del _name
