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
# # 02 · Norm + residual + scalar in one pass
#
# At the end of every Gemma 4 layer the feed-forward output goes through a norm, is added to the residual stream and
# multiplied by a per-layer scalar. Unfused, that is a chain of small elementwise kernels, each reading and writing
# the full activation.
#
# **What you will learn**
#
# - what the unfused chain dispatches (counted with `gemma4lab.lab.profiling.profile_forward`);
# - how many bytes it moves compared with one fused pass;
# - that `gemma_rmsnorm_residual_scalar` matches the reference;
# - how close the fused kernel gets to copy bandwidth on a real GPU (recorded results).

# %% tags=["parameters"]
DEVICE = "cpu"  # "cuda" for live GPU numbers
INTERACTIVE = True
DTYPE = "float32"
TOKENS = 16  # rows for kernel calls on CPU (the interpreter is slow)
HIDDEN = 256  # the bytes model below uses the real 2816
GPU_TOKENS = 4096

# %%
from gemma4lab.lab import notebook

ROOT = notebook.setup(DEVICE)  # on CPU: TRITON_INTERPRET=1, before any kernel is imported
RESULTS = ROOT / "results"

# %matplotlib inline
import torch
from IPython.display import display

import gemma4lab.kernels as K
from gemma4lab.lab import measure, viz
from gemma4lab.lab.profiling import profile_forward

dtype = getattr(torch, DTYPE)
T = GPU_TOKENS if DEVICE == "cuda" else TOKENS

# %% [markdown]
# ## The unfused chain
#
# Written the way the Hugging Face model runs it (`Gemma4RMSNorm`, then the residual add and the layer scalar in the
# activation dtype): the norm upcasts, normalises and multiplies by `w` in fp32 and rounds once; the add rounds
# again, the multiply by the scalar a third time. On a GPU each op is at least one kernel launch; on CPU
# `profile_forward` counts dispatched ATen ops as the proxy.

# %%
from gemma4lab.model.layers import rms_norm  # the package's unfused reference, op for op as transformers rounds


def unfused(x, w, r, s, eps=1e-6):
    y = rms_norm(x, w, eps)  # fp32 math, · w in fp32, one rounding to x's dtype (Gemma4RMSNorm)
    y = y + r  # residual, rounded
    return y * s  # layer scalar, rounded


gen = torch.Generator().manual_seed(0)
x, r = (torch.randn(T, HIDDEN, generator=gen).to(DEVICE, dtype) for _ in range(2))
w = (1 + 0.1 * torch.randn(HIDDEN, generator=gen)).to(DEVICE, dtype)
s = torch.tensor([0.7], device=DEVICE, dtype=dtype)

prof = profile_forward(lambda: unfused(x, w, r, s), warmup=1)
print(f"unfused: {prof['kernels']} {'kernels' if prof['device'] == 'cuda' else 'ATen ops'}")
for name, n in prof["top_kernels"]:
    print(f"  {n} × {name}")
print("fused: 1 kernel (by construction)")

# %% [markdown]
# ## Bytes moved
#
# Each elementwise op reads its inputs and writes its output to memory. Counting tensors of `T × H` (the weight
# and scalar are tiny and stay in cache), at bf16 and the real hidden size 2816:

# %%
H_REAL, B = 2816, 2
chain = {  # (reads, writes) in T×H activations, per op of the unfused chain
    "upcast x": (1, 2), "square": (2, 2), "mean": (2, 0), "x·rsqrt": (2, 2),
    "round to bf16": (2, 1), "·w": (1, 1), "+ residual": (2, 1), "·scalar": (1, 1),
}
unfused_bytes = sum(rd + wr for rd, wr in chain.values()) * H_REAL * B
fused_bytes = 3 * H_REAL * B  # read x, read residual, write out
print(f"unfused ≈ {unfused_bytes / 1e3:.1f} KB/token, fused = {fused_bytes / 1e3:.1f} KB/token "
      f"({unfused_bytes / fused_bytes:.1f}× less traffic)")

viz.plot_traffic(fused_bytes / 1e3, unfused_bytes / 1e3)

# %% [markdown]
# The op-by-op breakdown is approximate (fp32 intermediates are counted as two bf16 units), but the conclusion is
# not: a memory-bound chain costs what it moves, and the fused kernel moves the minimum, 3 × H × 2 bytes per token.
#
# ## Parity, where rounding shows: bf16
#
# In fp32 every implementation agrees to ~10⁻⁷ and a parity check shows nothing, so we check in bf16 (whatever
# `DTYPE` is). The kernel does its math in fp32 and rounds once; the unfused chain rounds three times. Against a
# float64 computation on the same bf16 inputs, prediction: every kernel element is within one bf16 rounding
# (2⁻⁸ relative) of the exact value, plus fp32's own rounding of the two terms `r·s` and `norm(x)·w·s` (~2⁻²⁴ of
# each; it only shows where the terms cancel and the result is near zero — a relative bound alone fails there on a
# GPU, whose reduction order and `rsqrt` differ from the interpreter's); the unfused chain's worst element is
# further away.

# %%
xb, rb, wb, sb = (t.to(torch.bfloat16) for t in (x, r, w, s))
out = K.gemma_rmsnorm_residual_scalar(xb, wb, rb, sb)
exact = K.gemma_rmsnorm_residual_scalar_ref(xb.double(), wb.double(), rb.double(), sb.double())
err_kernel = (out.double() - exact).abs()
err_unfused = (unfused(xb, wb, rb, sb).double() - exact).abs()
print("backend:", K.kernel_backend(xb))
print(f"max |kernel - fp64| / |fp64|  = {(err_kernel / exact.abs()).max().item():.2e}   (2⁻⁸ = {2**-8:.2e})")
print(f"max |unfused - fp64| / |fp64| = {(err_unfused / exact.abs()).max().item():.2e}")
terms = (rb.double() * sb.double()).abs() + K.gemma_rmsnorm_residual_scalar_ref(
    xb.double(), wb.double(), torch.zeros_like(rb, dtype=torch.float64), sb.double()).abs()  # |r·s| + |norm(x)·w·s|
bound = 2**-8 * exact.abs() + 2**-20 * terms  # one bf16 rounding + fp32's on the terms (16× slack)
assert (err_kernel <= bound).all(), "a kernel element is off by more than one bf16 rounding (+ fp32's on the terms)"
assert err_unfused.max() > err_kernel.max(), "three roundings were not worse than one here: look closer"

# ## How close to the bandwidth roof? (recorded on a GPU)
#
# `python -m gemma4lab bench-kernels` times each kernel against eager PyTorch and `torch.compile` and divides the
# bytes it must move by the time: the fraction of the card's device-to-device copy bandwidth. 1.0 is the roof.

# %%
NAME = "gemma_rmsnorm_residual_scalar"
recorded = viz.load_recorded("kernels", RESULTS)
rows = viz.kernel_rows(recorded[0], NAME) if recorded else []
if DEVICE == "cuda":
    bw = measure.copy_bandwidth(DEVICE, nbytes=2**28)
    ms = measure.bench(lambda: K.gemma_rmsnorm_residual_scalar(x, w, r, s))
    nbytes = 3 * x.numel() * x.element_size()
    print(f"live, T={T}, H={HIDDEN}: {ms * 1e3:.1f} us, {nbytes / ms / 1e6:.0f} GB/s = "
          f"{nbytes / (ms * 1e-3) / bw:.0%} of copy bandwidth ({torch.cuda.get_device_name()})")
if rows:
    display(viz.plot_roofline(rows, NAME, recorded[1]))
else:
    print("No recorded results/kernels_*.json with this kernel yet: run `python -m gemma4lab bench-kernels` on a GPU "
          "to produce one. (Nothing is plotted rather than showing made-up numbers.)")

# %% [markdown]
# Small T is launch-bound (a few microseconds whatever the size), so every implementation is far from the roof;
# large T is bandwidth-bound, where fewer bytes win.
#
# ## Exercise: where does the kernel reach half the roof?
#
# Model the kernel's time as a fixed cost plus its bytes over the bandwidth: `t(T) = t0 + 3·T·H·2 / BW`. The
# fraction of the roof it reaches is then `(bytes / BW) / t(T)`, one half when the two terms are equal. Take `t0`
# as the recorded time in a CUDA graph at the smallest T, `BW` as the recorded copy bandwidth, `H = 2816`, and set
# `t_half` to the token count where the kernel should reach half the roof. The check asks the recorded curve
# whether it crosses one half there.

# %%
t_half = None  # your answer: a number of tokens

# %% jupyter={"source_hidden": true} tags=["solution"]
if t_half is None and rows:
    t0 = rows[0]["graph_ms"] * 1e-3  # seconds at the smallest recorded T: almost all fixed cost
    bw = recorded[0]["roofs"]["copy_bandwidth_Bps"]
    t_half = t0 * bw / (3 * 2816 * 2)  # bytes(T) / BW == t0

# %%
if rows:
    below = [r for r in rows if r["tokens"] <= t_half]
    above = [r for r in rows if r["tokens"] >= t_half]
    print(f"predicted half-roof point: T ≈ {t_half:.0f}; recorded fractions: "
          + ", ".join(f"T={r['tokens']}: {r['graph_frac_copy']:.0%}" for r in rows))
    notebook.check(bool(below and above) and below[-1]["graph_frac_copy"] < 0.5 < above[0]["graph_frac_copy"],
                   "the recorded curve crosses one half between the recorded sizes around the prediction")
else:
    print("No recorded kernel results: the exercise needs a `bench-kernels` run.")

# %% [markdown]
# Next: `03_dual_norm_epilogue` fuses a much longer chain.
