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
# # 11 · The attention prologue: per-head norms and proportional RoPE in one kernel
#
# Between the q/k/v projections and attention, every Gemma 4 layer normalises each head of q and k with a learned
# weight, normalises each head of v *without* one, and rotates q and k (RoPE). In PyTorch that is a dozen small
# launches over tensors the GPU reads and writes again and again. This notebook derives the package's
# `qkv_norm_rope_` kernel in the order of the Triton tutorials: the unfused code and its bytes, a prediction, a
# kernel written here, grown step by step and checked at each step, then the package's kernel and its measurement.
#
# **What you will learn**
#
# - what the prologue computes, including K-as-V on full layers (V is the raw K projection) and *proportional*
#   RoPE (only a quarter of a 512-wide head rotates);
# - how many bytes it must move per token, and why that makes it memory-bound with a floor you can compute;
# - how `rotate_half` becomes plain arithmetic between two register tiles (no gather, no shuffle);
# - what the H200 measured against the prediction.

# %% tags=["parameters"]
DEVICE = "cpu"  # "cuda" for compiled kernels
INTERACTIVE = True
DTYPE = "float32"  # bf16 works on a GPU; the interpreter checks the same code in fp32 here
TOKENS = 24

# %%
from gemma4lab.lab import notebook

ROOT = notebook.setup(DEVICE)  # on CPU: TRITON_INTERPRET=1, before any kernel is imported
RESULTS = ROOT / "results"

# %matplotlib inline
import inspect

import torch
import triton
import triton.language as tl
from IPython.display import display

import gemma4lab
import gemma4lab.kernels as K
from gemma4lab.kernels import qkv_norm_rope as qkv_module
from gemma4lab.lab import viz
from gemma4lab.lab.profiling import profile_forward
from gemma4lab.model.layers import apply_rope, rms_norm, rope_cos_sin, rope_inv_freq

dtype = getattr(torch, DTYPE)
gen = torch.Generator().manual_seed(0)
torch.set_grad_enabled(False)  # inference throughout: the kernels have no backward

# %% [markdown]
# ## The unfused prologue
#
# This is the model's own code with fusion off (`gemma4lab.model.decoder.Attention.qkv`): per-head RMSNorm of q and k
# with their weights, RMSNorm of v without one, RoPE on q and k from per-token `cos`/`sin` tables. On a *full*
# layer of 26B-A4B there is no `v_proj`: V is the raw K projection, taken before `k_norm` and RoPE.

# %%
model = gemma4lab.random_init("tiny", dtype=dtype, device=DEVICE)
cfg = model.config.text
full = next(i for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i))
layer = model.language_model.layers[full].self_attn
D, HQ, HKV = layer.head_dim, layer.num_heads, layer.num_kv_heads
positions = torch.arange(TOKENS)
inv_freq = rope_inv_freq(D, cfg.rope_theta_full, cfg.rope_type_full, cfg.partial_rotary_factor_full)
cos, sin = (t.to(DEVICE) for t in rope_cos_sin(inv_freq, positions))
x = torch.randn(TOKENS, cfg.hidden_size, generator=gen).to(DEVICE, dtype)
print(f"tiny full layer {full}: {HQ} query heads and {HKV} KV head(s) of {D}, K-as-V: {layer.k_eq_v}")


def prologue_unfused(x):
    n = x.shape[0]
    q, k = layer.q_proj(x), layer.k_proj(x)
    v = k  # K-as-V
    q = apply_rope(layer.q_norm(q.view(n, -1, D)), cos, sin)
    k2 = apply_rope(layer.k_norm(k.view(n, -1, D)), cos, sin)
    v = rms_norm(v.view(n, -1, D), None, layer.eps)
    return q, k2, v


with torch.no_grad():
    q_ref, k_ref, v_ref = prologue_unfused(x)
    prof = profile_forward(lambda: prologue_unfused(x))
print(f"unfused: {prof['kernels']} launches (the two projections among them)")

# %% [markdown]
# ## Proportional RoPE is a table, not a new kernel
#
# Gemma 4's full layers use *proportional* RoPE: the exponent's denominator stays the full head dim and only the
# first `partial_rotary_factor · D / 2` frequencies are non-zero. A zero frequency means `cos = 1, sin = 0`: those
# dims pass through unchanged. So one kernel that takes per-token `cos`/`sin` tables covers both layer types; the
# table says which dims rotate (here: sin ≠ 0 at position 1).

# %%
rotating = (sin[1] != 0).nonzero().flatten().tolist()
print(f"head dim {D}, partial factor {cfg.partial_rotary_factor_full}: dims {rotating} rotate")
assert len(rotating) == int(cfg.partial_rotary_factor_full * D)

# %% [markdown]
# ## Bytes, and a prediction
#
# Every element of q, k and v is read once and written once; the kernel also reads one `cos` and one `sin` row per
# token (fp32). Per token, with `b`-byte activations: `(Hq + 2·Hkv) · D · 2b + 2 · D · 4` bytes. At 26B-A4B's sizes
# (sliding layers: 16 query and 8 KV heads of 256; full layers: 16 and 2 of 512) in bf16:

# %%
real = gemma4lab.Gemma4Config.preset("26b-a4b").text


def prologue_bytes(hq, hkv, d, act_bytes=2):
    return (hq + 2 * hkv) * d * 2 * act_bytes + 2 * d * 4


sliding_b = prologue_bytes(real.num_attention_heads, real.layer_kv_heads(0), real.layer_head_dim(0))
full_l = next(i for i in range(real.num_hidden_layers) if not real.is_sliding(i))
full_b = prologue_bytes(real.num_attention_heads, real.layer_kv_heads(full_l), real.layer_head_dim(full_l))
print(f"bytes per token: sliding {sliding_b / 1e3:.1f} KB, full {full_b / 1e3:.1f} KB")
notebook.check(abs(sliding_b - 34_816) < 1, "the module docstring's 34.8 KB per token on a sliding layer")

# %% [markdown]
# **Prediction.** Two flops per byte or so: far below any GPU's ridge point, so the fused kernel is bound by memory.
# At thousands of tokens it should stream at a large fraction of copy bandwidth (≥ 70 %); at 93 tokens, 3 MB is a
# few microseconds of traffic and the launch itself dominates. The unfused code moves each tensor 4–6 times.
#
# ## A kernel, step 1: normalise one head
#
# One program per (token, head): load the head's `D` values, compute `rsqrt(mean(x²) + eps)`, scale, store. The
# weight is per dim and shared by all heads.

# %%
@triton.jit
def head_norm_kernel(x_ptr, w_ptr, n_heads, eps, D: tl.constexpr):
    tok, head = tl.program_id(0), tl.program_id(1)
    offs = tl.arange(0, D)
    ptr = x_ptr + (tok * n_heads + head) * D + offs
    x = tl.load(ptr).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    tl.store(ptr, (x * inv * tl.load(w_ptr + offs).to(tl.float32)).to(ptr.dtype.element_ty))


q_try = layer.q_proj(x).detach().clone()
head_norm_kernel[(TOKENS, HQ)](q_try, layer.q_norm.weight, HQ, layer.eps, D=D)
torch.testing.assert_close(q_try.view(TOKENS, HQ, D), layer.q_norm(layer.q_proj(x).view(TOKENS, HQ, D)))
print("step 1: the per-head norm matches")

# %% [markdown]
# ## Step 2: RoPE on the two halves
#
# `rotate_half(x) = cat(-x[D/2:], x[:D/2])`, so with the head held as its two halves `lo = x[:D/2]` and
# `hi = x[D/2:]` (and `cos`/`sin` likewise; the neox table repeats its frequencies, so both halves share them):
#
# `out_lo = lo·cos − hi·sin`, `out_hi = hi·cos + lo·sin` — four multiplies, no data movement between lanes.

# %%
@triton.jit
def head_norm_rope_kernel(x_ptr, w_ptr, c_ptr, s_ptr, n_heads, eps, D: tl.constexpr, ROPE: tl.constexpr):
    tok, head = tl.program_id(0), tl.program_id(1)
    half = tl.arange(0, D // 2)
    ptr = x_ptr + (tok * n_heads + head) * D + half
    lo = tl.load(ptr).to(tl.float32)
    hi = tl.load(ptr + D // 2).to(tl.float32)
    inv = tl.rsqrt((tl.sum(lo * lo, axis=0) + tl.sum(hi * hi, axis=0)) / D + eps)
    lo = lo * inv * tl.load(w_ptr + half).to(tl.float32)
    hi = hi * inv * tl.load(w_ptr + D // 2 + half).to(tl.float32)
    if ROPE:
        c = tl.load(c_ptr + tok * D + half)
        s = tl.load(s_ptr + tok * D + half)
        lo, hi = lo * c - hi * s, hi * c + lo * s
    tl.store(ptr, lo.to(ptr.dtype.element_ty))
    tl.store(ptr + D // 2, hi.to(ptr.dtype.element_ty))


q_try = layer.q_proj(x).detach().clone()
head_norm_rope_kernel[(TOKENS, HQ)](q_try, layer.q_norm.weight, cos, sin, HQ, layer.eps, D=D, ROPE=True)
tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
torch.testing.assert_close(q_try.view(TOKENS, HQ, D), q_ref, **tol)
print("step 2: norm + RoPE match the unfused q")

# %% [markdown]
# ## Step 3: q, k and v in one launch
#
# A second grid axis over *all* heads: the first `Hq` are q's, the next `Hkv` k's, the last `Hkv` v's, each with its
# own pointer, weight (none for v) and RoPE switch. One launch instead of three (and instead of a dozen unfused).
# K-as-V needs one copy first: v must be the raw K projection, and k is normalised in place.

# %%
@triton.jit
def qkv_kernel(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, c_ptr, s_ptr, HQ: tl.constexpr, HKV: tl.constexpr, eps,
               D: tl.constexpr):
    tok, head = tl.program_id(0), tl.program_id(1)
    half = tl.arange(0, D // 2)
    if head < HQ:
        ptr = q_ptr + (tok * HQ + head) * D + half
        w_ptr = qw_ptr
    elif head < HQ + HKV:
        ptr = k_ptr + (tok * HKV + head - HQ) * D + half
        w_ptr = kw_ptr
    else:
        ptr = v_ptr + (tok * HKV + head - HQ - HKV) * D + half
        w_ptr = kw_ptr  # unused: v has no weight
    lo = tl.load(ptr).to(tl.float32)
    hi = tl.load(ptr + D // 2).to(tl.float32)
    inv = tl.rsqrt((tl.sum(lo * lo, axis=0) + tl.sum(hi * hi, axis=0)) / D + eps)
    lo, hi = lo * inv, hi * inv
    if head < HQ + HKV:  # q and k: weight, then RoPE; v: neither
        lo = lo * tl.load(w_ptr + half).to(tl.float32)
        hi = hi * tl.load(w_ptr + D // 2 + half).to(tl.float32)
        c = tl.load(c_ptr + tok * D + half)
        s = tl.load(s_ptr + tok * D + half)
        lo, hi = lo * c - hi * s, hi * c + lo * s
    tl.store(ptr, lo.to(ptr.dtype.element_ty))
    tl.store(ptr + D // 2, hi.to(ptr.dtype.element_ty))


with torch.no_grad():
    q3, k3 = layer.q_proj(x), layer.k_proj(x)
    v3 = k3.clone()  # K-as-V: the raw projection, before k is normalised in place
    qkv_kernel[(TOKENS, HQ + 2 * HKV)](q3, k3, v3, layer.q_norm.weight, layer.k_norm.weight, cos, sin, HQ, HKV,
                                       layer.eps, D=D)
for got, ref in ((q3, q_ref), (k3, k_ref), (v3, v_ref)):
    torch.testing.assert_close(got.view(TOKENS, -1, D), ref, **tol)
print("step 3: q, k and v in one launch match the unfused prologue")

# %% [markdown]
# ## The package's kernel
#
# `gemma_qkv_norm_rope_` is step 3 grown for production: a block of tokens per program (heads fastest in the grid,
# so the heads of a token block run together and share the `cos`/`sin` rows from L2), any row stride (q, k, v may be
# column slices of one fused projection), head dims that are not a power of two (masked halves), fp32 math from load
# to store and one rounding. Its per-head body:

# %%
print(inspect.getsource(qkv_module._head.fn))  # .fn: the Python function under @triton.jit

# %%
with torch.no_grad():
    q4, k4 = layer.q_proj(x), layer.k_proj(x)
    v4 = k4.clone()
    K.gemma_qkv_norm_rope_(q4, k4, v4, layer.q_norm.weight, layer.k_norm.weight, cos, sin, eps=layer.eps)
    for got, mine in ((q4, q3), (k4, k3), (v4, v3)):
        torch.testing.assert_close(got, mine, **tol)
    prof_fused = profile_forward(lambda: layer.qkv(x, cos, sin, fused=True))
print(f"the package's kernel equals step 3; the fused prologue: {prof_fused['kernels']} launches "
      f"(was {prof['kernels']}), projections and K-as-V's copy included")
assert prof_fused["kernels"] <= 4 < prof["kernels"]  # two projections, the clone, one kernel

# %% [markdown]
# ## Measured on an H200
#
# `bench-kernels` times the kernel at the real shapes against the unfused code and `torch.compile`, in and out of
# CUDA graphs. The prediction was ≥ 70 % of copy bandwidth from a few thousand tokens on, and launch-dominated
# below:

# %%
rec = viz.load_recorded("kernels", RESULTS)
names = ("qkv_norm_rope_sliding", "qkv_norm_rope_full")
if rec:
    doc, label = rec
    display(viz.plot_kernels(doc, kernels=names))
    print("\n".join(viz.kernel_lines(doc, names)))
    big = [r["graph_frac_copy"] for k in names for r in viz.kernel_rows(doc, k) if r["tokens"] >= 2893]
    notebook.check(min(big) >= 0.7, f"≥ 70 % of copy bandwidth from 2893 tokens on ({label})")
else:
    print("No recorded results/kernels_*.json: run `python -m gemma4lab bench-kernels` on a GPU.")

# %% [markdown]
# Why not 90 %? Each program reads one head (512–1 KB per token row) and writes it back in place: short rows, two
# passes over registers, and two `cos`/`sin` loads per head that L2 serves. The row-norm kernels of notebooks 02–03
# stream 5.6 KB rows and reach ~90 %.
#
# ## Exercises
#
# Each exercise has a cell for your answer, a collapsed solution cell that fills in only what you left as `None`,
# and a check.
#
# **1. Which dims rotate?** Write `rotated_dims(D, factor)`: the dims of a `D`-wide head that proportional RoPE
# rotates with `partial_rotary_factor = factor` (neox layout: the first `factor·D/2` of each half). The check
# compares it with the table of a 512-wide head.

# %%
rotated_dims = None  # your answer: a function (D, factor) -> list of ints

# %% jupyter={"source_hidden": true} tags=["solution"]
if rotated_dims is None:
    def rotated_dims(D, factor):
        n = int(factor * D // 2)
        return list(range(n)) + list(range(D // 2, D // 2 + n))

# %%
_, sin512 = rope_cos_sin(rope_inv_freq(512, 1e6, "proportional", 0.25), torch.arange(3))
truth = (sin512[1] != 0).nonzero().flatten().tolist()
print(f"512-wide head, factor 0.25: {len(truth)} dims rotate, from {truth[0]} to {truth[-1]}")
notebook.check(rotated_dims(512, 0.25) == truth, "the dims where the table's sin is non-zero")

# %% [markdown]
# **2. The floor at 11 533 tokens.** With the copy bandwidth the H200 run measured (or 4.2 TB/s), what is the least
# time the prologue of one *full* layer can take at 11 533 tokens? Set `floor_us`. The check compares it with the
# recorded kernel: it must be below the measurement and within a factor 1.5 of it.

# %%
floor_us = None  # your answer: microseconds

# %% jupyter={"source_hidden": true} tags=["solution"]
if floor_us is None:
    bw = rec[0]["roofs"]["copy_bandwidth_Bps"] if rec else 4.2e12
    floor_us = 11_533 * full_b / bw * 1e6

# %%
if rec:
    measured = next(r for r in rec[0]["results"] if r["kernel"] == "qkv_norm_rope_full" and r["tokens"] == 11_533)
    print(f"floor {floor_us:.0f} µs, measured {measured['graph_ms'] * 1e3:.0f} µs")
    notebook.check(floor_us < measured["graph_ms"] * 1e3 < 1.5 * floor_us, "below the measurement, within 1.5x")
else:
    notebook.check(100 < floor_us < 200, "about 140 µs at 4.2 TB/s")
