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
RESULTS = ROOT / "results"

# %matplotlib inline
import torch
from IPython.display import display

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
# ## Bytes moved, and the prediction they make
#
# Counting `T × H` activations per op of the unfused chain as notebook 02 does (an fp32 intermediate counts as two
# bf16 units; weights and the scalar stay in cache), at bf16 and the real hidden size 2816:

# %%
H_REAL, B = 2816, 2
one_rms = {"upcast": (1, 2), "square": (2, 2), "mean": (2, 0), "·rsqrt": (2, 2), "·w": (2, 2), "round": (2, 1)}
chain = {**{f"rms {n}: {op}": rw for n in ("d", "m", "sum") for op, rw in one_rms.items()},
         "d + m": (2, 1), "+ residual": (2, 1), "·scalar": (1, 1)}
unfused_bytes = sum(rd + wr for rd, wr in chain.values()) * H_REAL * B
fused_bytes = 4 * H_REAL * B  # read d, m, residual; write out
print(f"unfused ≈ {unfused_bytes / 1e3:.0f} KB/token over {len(chain)} ops, fused = {fused_bytes / 1e3:.1f} KB/token "
      f"({unfused_bytes / fused_bytes:.0f}× less traffic)")
viz.plot_traffic(fused_bytes / 1e3, unfused_bytes / 1e3)

# %% [markdown]
# **Prediction:** at large T the kernel is memory-bound, so it should run near the copy bandwidth: 4 × 2816 × 2
# bytes per token over ~4.2 TB/s, about 5.4 µs per 1000 tokens; at small T a launch (a few µs) dominates and the
# fraction of bandwidth falls. The recorded curve (bench-kernels on an H200) checks it.

# %%
recorded = viz.load_recorded("kernels", RESULTS)
rows = viz.kernel_rows(recorded[0], "dual_rmsnorm_residual_scalar") if recorded else []
if rows:
    display(viz.plot_roofline(rows, "dual_rmsnorm_residual_scalar", recorded[1]))
    big = max(rows, key=lambda r: r["tokens"])
    print(f"recorded at T={big['tokens']}: {big['graph_frac_copy']:.0%} of copy bandwidth inside a CUDA graph")
    assert big["graph_frac_copy"] > 0.85, "the prediction: near the roof at large T"
else:
    print("No recorded results/kernels_*.json yet: run `python -m gemma4lab bench-kernels` on a GPU.")
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
# ## Exercise: the dual kernel from the single one
#
# Notebook 01 wrote a one-row-per-program RMSNorm kernel. Grow it into this notebook's epilogue: a `@triton.jit`
# kernel, one program per row, that loads `d`, `m` and `r`, computes `(rms(rms(d)·w1 + rms(m)·w2)·w3 + r)·s` in
# fp32 and stores once. Set `my_dual` to a function `(d, w1, m, w2, w3, r, s) -> out`; the check compares it with
# the package's reference. (The collapsed solution cell runs only if you leave `my_dual` as `None`.)

# %%
my_dual = None  # your answer: a function (d, w1, m, w2, w3, r, s) -> out

# %% jupyter={"source_hidden": true} tags=["solution"]
if my_dual is None:
    import triton
    import triton.language as tl

    @triton.jit
    def _norm(x, mask, n, eps):
        return x / tl.sqrt(tl.sum(tl.where(mask, x * x, 0.0), axis=0) / n + eps)

    @triton.jit
    def _row(p, mask):  # a row (or a weight vector) in fp32; helpers are jit functions: compiled Triton has no lambda
        return tl.load(p, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _dual_kernel(d_ptr, w1_ptr, m_ptr, w2_ptr, w3_ptr, r_ptr, s_ptr, o_ptr, n, stride, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        at = row * stride + cols
        mid = (_norm(_row(d_ptr + at, mask), mask, n, eps) * _row(w1_ptr + cols, mask)
               + _norm(_row(m_ptr + at, mask), mask, n, eps) * _row(w2_ptr + cols, mask))
        y = (_norm(mid, mask, n, eps) * _row(w3_ptr + cols, mask) + _row(r_ptr + at, mask)) \
            * tl.load(s_ptr).to(tl.float32)
        tl.store(o_ptr + row * stride + cols, y.to(o_ptr.dtype.element_ty), mask=mask)

    def my_dual(d, w1, m, w2, w3, r, s, eps=1e-6):
        out = torch.empty_like(d)
        _dual_kernel[(d.shape[0],)](d, w1, m, w2, w3, r, s, out, d.shape[1], d.stride(0), eps,
                                    BLOCK=triton.next_power_of_2(d.shape[1]))
        return out

# %%
mine, ref = my_dual(*args).float(), K.gemma_dual_rmsnorm_residual_scalar_ref(*args).float()
worst = ((mine - ref).abs() / (ref.abs() + 1e-3)).max().item()
print(f"max relative difference from the reference: {worst:.1e} (one bf16 step, an ulp, is up to {2**-7:.1e} of a "
      "value)")
notebook.check(worst <= 2**-6, "the reference's values, to a bf16 ulp or two (sums in another order round apart)")

# %% [markdown]
# Next: `04_decoder_layer` switches these kernels on inside a whole model.
