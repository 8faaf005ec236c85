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
# # 01 · RMSNorm, the Gemma 4 way
#
# Every fused kernel in this repo is an RMSNorm with something bolted on. So we start with the norm itself.
#
# **What you will learn**
#
# - the Gemma 4 RMSNorm formula (`x · rsqrt(mean(x²) + eps) · w`, *not* Gemma 1–3's `· (1 + w)`);
# - why the sum of squares is accumulated in fp32, and what rounding to bf16 costs (measured against float64);
# - how to write a first Triton kernel, one row per program, and check it against the reference;
# - where the package's production kernel lives.

# %% tags=["parameters"]
DEVICE = "cpu"  # "cuda" for compiled kernels
INTERACTIVE = True
DTYPE = "float32"
TOKENS = 16  # rows for kernel calls (the CPU interpreter is slow: keep it small)
HIDDEN = 256  # Gemma 4 26B-A4B uses 2816
SAMPLES = 4096  # rows for the precision study (pure torch, cheap)

# %%
from gemma4lab.lab import notebook

ROOT = notebook.setup(DEVICE)  # on CPU: TRITON_INTERPRET=1, before any kernel is imported

# %matplotlib inline
import torch
import triton
import triton.language as tl

import gemma4lab.kernels as K
from gemma4lab.lab import viz

dtype = getattr(torch, DTYPE)
print("kernel backend for", DEVICE, "tensors:", K.kernel_backend(torch.empty(1, device=DEVICE)))

# %% [markdown]
# ## The math
#
# $$y = \frac{x}{\sqrt{\tfrac1H\sum_i x_i^2 + \varepsilon}} \cdot w$$
#
# Gemma 1–3 stored `w` as an offset and multiplied by `1 + w`; Gemma 4 stores the scale itself. Loading a Gemma 4
# checkpoint into a Gemma 3 norm silently adds 1 to every weight — the first bug to rule out when logits look off.
#
# The reference computes in fp32 whatever the activation dtype, and rounds once at the end.

# %%
def rmsnorm_ref(x, w, eps=1e-6):
    xf = x.float() if x.dtype != torch.float64 else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.to(xf.dtype)
    return y.to(x.dtype)


gen = torch.Generator().manual_seed(0)
x64 = torch.randn(SAMPLES, HIDDEN, generator=gen, dtype=torch.float64) * 3
w64 = 1 + 0.1 * torch.randn(HIDDEN, generator=gen, dtype=torch.float64)
exact = rmsnorm_ref(x64, w64)

# %% [markdown]
# ## What bf16 does to it
#
# bf16 keeps 8 significant bits (7 stored, one implicit). Rounding to nearest moves a value by at most half a unit
# in the last place, and half an ulp is 2⁻⁹ of the *top* of a binade but 2⁻⁸ of its bottom: one rounding has a
# relative error of up to 2⁻⁸ ≈ 0.39 %. Two ways to get a bf16 result:
#
# * **one rounding**: bf16 in, fp32 math, bf16 out (what our kernels do);
# * **bf16 math**: every intermediate (square, mean, rsqrt, products) rounded to bf16, as a naive chain of bf16
#   ops would.
#
# We compare both against float64 on the *same* bf16 inputs, so only the computation's rounding is measured.
# Prediction: one rounding never exceeds 2⁻⁸ (fp32 math adds ~10⁻⁷); bf16 math exceeds it somewhere.

# %%
xb, wb = x64.to(torch.bfloat16), w64.to(torch.bfloat16)
truth = rmsnorm_ref(xb.double(), wb.double())  # exact result for the rounded inputs
one_rounding = rmsnorm_ref(xb, wb).double()
bf16_math = (xb * torch.rsqrt(xb.pow(2).mean(-1, keepdim=True) + 1e-6) * wb).double()
rel = {name: ((y - truth).abs() / truth.abs().clamp_min(1e-3)).flatten()
       for name, y in (("fp32 math, one rounding", one_rounding), ("bf16 math, many roundings", bf16_math))}
for name, e in rel.items():
    print(f"{name:>26}: mean rel err {e.mean():.2e}, max {e.max():.2e}  (2⁻⁸ = {2**-8:.2e})")
assert rel["fp32 math, one rounding"].max() <= 2**-8 * (1 + 1e-4), "one rounding beyond 2⁻⁸: a bug in the reference"
assert rel["bf16 math, many roundings"].max() > 2**-8, "many roundings stayed within one rounding's bound"

# %%
viz.plot_error_histograms(rel, SAMPLES, HIDDEN)

# %% [markdown]
# One rounding keeps every element within 2⁻⁸ (the assertions above check both predictions); bf16 math spreads
# errors well past it. That is the
# precision argument for fusing: a fused kernel can afford fp32 everywhere because intermediates never leave
# registers. Move the slider to see the histogram settle as rows are added.

# %%
if INTERACTIVE:
    from ipywidgets import IntSlider, interact

    interact(lambda rows: viz.plot_error_histograms(rel, rows, HIDDEN),
             rows=IntSlider(value=256, min=16, max=SAMPLES, step=16, description="rows"))

# %% [markdown]
# ## A first Triton kernel
#
# One program per row: load the row (upcast to fp32), reduce its sum of squares, scale, store. `BLOCK` must be a
# power of two, so we mask the columns past `H`. Under `TRITON_INTERPRET=1` the same code runs on CPU tensors.

# %%
@triton.jit
def rmsnorm_kernel(x_ptr, w_ptr, y_ptr, stride, H, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride + cols, (x * inv * w).to(y_ptr.dtype.element_ty), mask=mask)


def rmsnorm_triton(x, w, eps=1e-6):
    y = torch.empty_like(x)
    rmsnorm_kernel[(x.shape[0],)](x, w, y, x.stride(0), x.shape[1], eps, BLOCK=triton.next_power_of_2(x.shape[1]))
    return y


x = x64[:TOKENS].to(DEVICE, dtype)
w = w64.to(DEVICE, dtype)
y = rmsnorm_triton(x, w)
print("max |triton - reference| =", (y - rmsnorm_ref(x, w)).abs().max().item())

# %% [markdown]
# A `BLOCK = next_pow2(H)` tile wastes lanes when `H` is not a power of two (2816 → 4096 leaves 31 % of them
# masked). Masked lanes cost registers and instructions, not memory traffic: a masked load fetches nothing. The
# package's row kernels keep this one masked tile per row and win their bandwidth elsewhere: a *persistent* grid (two
# programs per SM, each loading its weights once and looping over rows) with a software pipeline that prefetches the
# next row while the current one is reduced; see `gemma4lab/kernels/_common.py`.
#
# ## The package's kernel
#
# The package has no standalone RMSNorm: in Gemma 4 a norm is always followed by something else. Its smallest
# kernel, `gemma_rmsnorm_residual_scalar`, computes `(rms(x)·w + residual)·scalar`; with a zero residual and a
# scalar of one it *is* an RMSNorm, which makes a handy check.

# %%
zeros, one = torch.zeros_like(x), torch.ones(1, device=DEVICE, dtype=dtype)
y_pkg = K.gemma_rmsnorm_residual_scalar(x, w, zeros, one)
print("backend:", K.kernel_backend(x))
print("max |package - reference| =", (y_pkg - rmsnorm_ref(x, w)).abs().max().item())
print("max |package - notebook kernel| =", (y_pkg - y).abs().max().item())

# %% [markdown]
# ## Exercise: the residual and the scalar
#
# Gemma 4 follows a norm with a residual add and a per-layer scalar: `(rms(x)·w + residual)·scalar`. Grow
# `rmsnorm_kernel` into that: load the residual row too, read the scalar once, keep everything in fp32 and store
# once. Set `my_rms_res_scalar` to a function `(x, w, residual, scalar) -> out`; the check compares it with the
# package's reference. (The collapsed solution cell runs only if you leave it as `None`.)

# %%
my_rms_res_scalar = None  # your answer: a function (x, w, residual, scalar) -> out

# %% jupyter={"source_hidden": true} tags=["solution"]
if my_rms_res_scalar is None:

    @triton.jit
    def rms_res_scalar_kernel(x_ptr, w_ptr, r_ptr, s_ptr, y_ptr, stride, H, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = (x * tl.rsqrt(tl.sum(x * x, axis=0) / H + eps) * w + r) * tl.load(s_ptr).to(tl.float32)
        tl.store(y_ptr + row * stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)

    def my_rms_res_scalar(x, w, residual, scalar, eps=1e-6):
        y = torch.empty_like(x)
        rms_res_scalar_kernel[(x.shape[0],)](x, w, residual, scalar, y, x.stride(0), x.shape[1], eps,
                                             BLOCK=triton.next_power_of_2(x.shape[1]))
        return y

# %%
res = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
scale = torch.tensor([0.7], device=DEVICE, dtype=dtype)
mine = my_rms_res_scalar(x, w, res, scale).float()
ref = K.gemma_rmsnorm_residual_scalar_ref(x, w, res, scale).float()
worst = ((mine - ref).abs() / (ref.abs() + 1e-3)).max().item()
print(f"max relative difference from the reference: {worst:.1e}")
notebook.check(worst <= 2**-6, "the reference's values, to a rounding step or two")

# %% [markdown]
# Next: `02_norm_residual_scalar` puts the residual and the scalar to work and counts the bytes saved.
