# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py//py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · The MoE epilogue: three norms, one kernel
#
# A Gemma 4 MoE layer ends with two branches (the dense MLP and the experts), each normalised, summed, normalised
# again, added to the residual and scaled:
#
# $$\text{out} = \big(\operatorname{rms}(\operatorname{rms}(d)\,w_1 + \operatorname{rms}(m)\,w_2)\,w_3 + r\big)\cdot s$$
#
# **What you will learn**
#
# - how many ops the unfused epilogue dispatches, and why one kernel suffices;
# - that one rounding beats many: bf16 error vs float64 of the unfused chain and of the fused kernel;
# - parity of `gemma_dual_rmsnorm_residual_scalar` with its reference.

# %% tags=["parameters"]
DEVICE = "cpu"  # "cuda" for compiled kernels
INTERACTIVE = True
DTYPE = "bfloat16"  # the precision study is about bf16
TOKENS = 16  # rows for kernel calls on CPU (the interpreter is slow)
HIDDEN = 256
GPU_TOKENS = 4096

# %%
from gemma4lab.lab import notebook

ROOT = notebook.setup(DEVICE)  # on CPU: TRITON_INTERPRET=1, before any kernel is imported

# %matplotlib inline
import torch

import gemma4lab.kernels as K
from gemma4lab.lab import viz
from gemma4lab.lab.profiling import profile_forward

dtype = getattr(torch, DTYPE)
T = GPU_TOKENS if DEVICE == "cuda" else TOKENS

# %% [markdown]
# ## The unfused chain
#
# As the reference runs it in bf16: every norm rounds its output, the sum rounds, the residual add rounds, the
# scalar multiply rounds.

# %%
def rms(x, w, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def unfused(d, w1, m, w2, w3, r, s):
    return (rms(rms(d, w1) + rms(m, w2), w3) + r) * s


gen = torch.Generator().manual_seed(0)
d, m, r = (torch.randn(T, HIDDEN, generator=gen).to(DEVICE, dtype) for _ in range(3))
w1, w2, w3 = ((1 + 0.2 * torch.randn(HIDDEN, generator=gen)).to(DEVICE, dtype) for _ in range(3))
s = torch.tensor([0.8], device=DEVICE, dtype=dtype)
args = (d, w1, m, w2, w3, r, s)

prof = profile_forward(lambda: unfused(*args), warmup=1)
print(f"unfused epilogue: {prof['kernels']} {'kernels' if prof['device'] == 'cuda' else 'ATen ops'}; fused: 1")

# %% [markdown]
# Each of those ops reads and writes `T × H`; the fused kernel reads `d`, `m`, `r` once and writes once. The middle
# sum never leaves registers, so it stays in fp32: no extra rounding and no extra bytes.
#
# ## One rounding vs many
#
# Same bf16 inputs, three computations: the exact float64 result, the unfused bf16 chain, and the fused kernel.

# %%
exact = K.gemma_dual_rmsnorm_residual_scalar_ref(*(a.double() for a in args))
fused = K.gemma_dual_rmsnorm_residual_scalar(*args)
chain = unfused(*args)
print("backend:", K.kernel_backend(d))
err = {}
for name, y in (("unfused chain", chain), ("fused kernel", fused)):
    e = (y.double() - exact).abs()
    err[name] = (e.mean().item(), e.max().item())
    print(f"{name:>14}: mean |err| {err[name][0]:.2e}, max {err[name][1]:.2e}")

# %%
viz.plot_error_bars(err, f"MoE epilogue in {DTYPE}, {T} × {HIDDEN}")

# %% [markdown]
# The fused kernel differs from the exact result by its single final rounding; the chain adds an error at every
# step, and the inner norms' errors are then amplified by the outer norm. In other words: the fused kernel is not
# bit-identical to Hugging Face, and it should not be — it is closer to the true value.
#
# ## Parity with the reference
#
# The `_ref` twin does the same fp32 math in plain torch; kernel and twin should agree to the last bit or one
# bf16 ulp (accumulation order differs).

# %%
ref = K.gemma_dual_rmsnorm_residual_scalar_ref(*args)
diff = (fused.float() - ref.float()).abs()
print(f"max |kernel - ref| = {diff.max().item():.3e}; rows differing: {(diff.amax(-1) > 0).sum().item()} of {T}")
torch.testing.assert_close(fused.float(), ref.float(), atol=2e-2, rtol=1e-2)

# %% [markdown]
# Next: `04_decoder_layer` switches these kernels on inside a whole model.
