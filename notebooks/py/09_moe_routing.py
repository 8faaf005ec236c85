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
# # 09 · Routing and the expert GEMM
#
# Between the router and the experts, a mixture-of-experts layer does bookkeeping: which routed rows go to which
# expert, in what order, and where each result goes back. At a short prompt it moves almost no bytes but, written
# in PyTorch, takes a dozen launches; the expert matmuls after it are a stream over the experts' weights.
#
# **What you will learn**
#
# - what the unfused bookkeeping does (a stable sort, a histogram, a prefix sum, an inverse permutation) and what
#   it costs in launches and bytes;
# - how a counting sort does it in one launch with no sort at all — written here, then the package's `moe_route`;
# - the gated GELU between an MLP's two GEMMs: its launches and bytes unfused, a kernel written here and grown into
#   the package's `gelu_tanh_and_mul` (what the dense MLP runs), and the experts' step further, the same product
#   computed in the expert GEMM's operand load;
# - why the expert GEMM at a short prompt is a weight stream, and its floor;
# - a prediction about row tiles that an H200 refuted, why, and the operand swap that made it come true;
# - moving the floor itself: FP8 experts, their bytes and their error.

# %% tags=["parameters"]
DEVICE = "cpu"  # "cuda" for compiled kernels
INTERACTIVE = True
DTYPE = "float32"  # the fused MoE kernels run in fp32 under the CPU interpreter
TOKENS = 24

# %%
from gemma4lab.lab import notebook

ROOT = notebook.setup(DEVICE)  # on CPU: TRITON_INTERPRET=1, before any kernel is imported
RESULTS = ROOT / "results"

# %matplotlib inline
import copy
import inspect
import math

import torch
import triton
import triton.language as tl
from IPython.display import display

import gemma4lab
import gemma4lab.kernels as K
from gemma4lab.lab import measure, viz
from gemma4lab.lab.profiling import profile_forward
from gemma4lab.model.layers import MLP, gelu_tanh

dtype = getattr(torch, DTYPE)

# %% [markdown]
# ## The routed rows
#
# The router picks `k` experts per token, so a prompt of `T` tokens becomes `T·k` *routed slots*; slot
# `s = t·k + j` is token `t`'s `j`-th choice. The expert GEMMs want the slots grouped by expert (each expert's rows
# contiguous) and the offsets where each expert's rows end — the layout `torch.nn.functional.grouped_mm` takes.

# %%
model = gemma4lab.random_init("tiny", dtype=dtype, device=DEVICE)
cfg = model.config.text
E, k = cfg.num_experts, cfg.top_k_experts
gen = torch.Generator().manual_seed(0)
logits = torch.randn(TOKENS, E, generator=gen).to(DEVICE)
weights, ids = K.gemma_router_topk(logits, torch.ones(E, device=DEVICE), k)
print(f"{TOKENS} tokens × top-{k} of {E} experts = {ids.numel()} routed slots; first tokens' choices:")
print(ids[:3].tolist())

# %% [markdown]
# ## The bookkeeping, unfused
#
# This is the plain-torch twin of the package's routing kernel, the code the model runs without fusion:

# %%
print(inspect.getsource(K.gemma_moe_route_ref))
prof = profile_forward(lambda: K.gemma_moe_route_ref(ids, E), warmup=1)
print(f"unfused bookkeeping: {prof['kernels']} {'kernels' if prof['device'] == 'cuda' else 'ATen ops'} "
      f"(on a GPU the stable sort alone is a radix sort of several kernels)")

# %% [markdown]
# **Prediction.** The bytes are tiny (`T·k` ids in, three small int32 arrays out: at 93 tokens ~6 KB), so on a GPU
# each of those launches costs its fixed few microseconds and nothing more: the fix is *fewer launches*, not
# fewer bytes. The recorded sweep below measures it.
#
# ## A counting sort in one launch
#
# No sort is needed: with `E` experts, one program per expert can count how many slots pick a *smaller* expert
# (that is where its rows start) and how many pick *it* (how many rows it gets), then walk the slots once more and
# write its own in slot order. Every output element has one writer and no atomics, so the result is deterministic —
# exactly a stable argsort.

# %%
@triton.jit
def route_kernel(ids_ptr, offs_ptr, slot_ptr, n_slots, BLOCK: tl.constexpr):
    e = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    before = tl.zeros((), dtype=tl.int32)
    mine = tl.zeros((), dtype=tl.int32)
    for s0 in range(0, n_slots, BLOCK):  # pass 1: my first row and my row count
        x = tl.load(ids_ptr + s0 + lanes, mask=s0 + lanes < n_slots, other=-1)
        before += tl.sum(((x >= 0) & (x < e)).to(tl.int32), axis=0)  # int32 sums: compiled Triton keeps the
        mine += tl.sum((x == e).to(tl.int32), axis=0)  # loop-carried type fixed (a bool sum is not int32 there)
    tl.store(offs_ptr + e, before + mine)
    row = before
    for s0 in range(0, n_slots, BLOCK):  # pass 2: my slots, in slot order
        x = tl.load(ids_ptr + s0 + lanes, mask=s0 + lanes < n_slots, other=-1)
        hit = x == e
        tl.store(slot_ptr + row + tl.cumsum(hit.to(tl.int32), axis=0) - 1, s0 + lanes, mask=hit)
        row += tl.sum(hit.to(tl.int32), axis=0)


def route(ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = ids.reshape(-1).contiguous()
    offsets = torch.full((n_experts,), -1, dtype=torch.int32, device=flat.device)  # poisoned: every entry is written
    slots = torch.full((flat.numel(),), -1, dtype=torch.int32, device=flat.device)
    route_kernel[(n_experts,)](flat, offsets, slots, flat.numel(), BLOCK=64)
    return offsets, slots


offsets, slots = route(ids, E)
want_offsets, want_slots, _ = K.gemma_moe_route_ref(ids, E)
assert torch.equal(offsets, want_offsets) and torch.equal(slots, want_slots), "the counting sort must equal argsort"
print("counting sort == stable argsort + cumulative histogram:", True)
print("rows per expert:", torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist())

# %% [markdown]
# ## The package's kernel
#
# `gemma_moe_route` is the same idea grown up: it also writes the inverse permutation (where each slot's result
# lands, for the combine), guards ids out of range on the device, and is registered as `torch.ops.gemma4lab.moe_route`
# so CUDA graphs and `torch.compile` see one op. On a GPU each program ranks one expert (`EXPERTS = 1`: 128 programs
# scanning the same ids side by side); under the CPU interpreter, which pays per operation, one program ranks every
# expert at once with `[EXPERTS, BLOCK]` comparisons — the same counts and the same rows. Its kernel:

# %%
from gemma4lab.kernels import moe_route as route_module

print(inspect.getsource(route_module._moe_route_kernel.fn))  # .fn: the Python function under @triton.jit
pkg_offsets, pkg_slots, pkg_position = K.gemma_moe_route(ids, E)
assert torch.equal(pkg_offsets, want_offsets) and torch.equal(pkg_slots, want_slots)
prof_fused = profile_forward(lambda: K.gemma_moe_route(ids, E), warmup=1)
print(f"fused: {prof_fused['kernels']} launch, against {prof['kernels']} unfused")

# %% [markdown]
# ## Between the two GEMMs: the gated GELU
#
# Every MLP in Gemma 4 (the dense one that runs beside the experts in each layer, and each of the 128 experts)
# computes `down(gelu_tanh(gate) · up)`: two matrix products with an elementwise activation between them. The dense
# MLP runs the activation as a kernel of its own, the package's `gelu_tanh_and_mul` (notebook 04's switch
# `Fusion.gelu`); the experts go one step further and compute it inside their GEMM. This section derives the kernel
# in the course's order (the model's code, its launches and bytes, a kernel written here and grown, the package's
# kernel, the H200's measurement) and then the fold. The dense MLP as the model runs it, fusion off or on:

# %%
print(inspect.getsource(MLP.forward))

# %% [markdown]
# ### Unfused: two launches and an intermediate
#
# `gelu_tanh(gate) * up` is two elementwise ops. `gelu` reads `gate` and writes a `[T, I]` intermediate; the
# multiply reads it back, reads `up` and writes the output. With `b` bytes per element that is `2·I·b + 3·I·b =
# 5·I·b` per token in two launches. One kernel reads `gate` and `up` once, keeps `gelu(gate)` in registers and
# writes once: `3·I·b` in one launch, 40 % fewer bytes. **Prediction** at 26B-A4B's dense MLP, in bf16:

# %%
real = gemma4lab.Gemma4Config.preset("26b-a4b").text
I_DENSE = real.intermediate_size  # the dense MLP's width


def gelu_bytes(t, inter, elem_bytes, fused):
    """Bytes the activation moves on [t, inter]: gate and up read and the output written (3 tensors); unfused, the
    intermediate gelu(gate) is written and read back as well (5)."""
    return (3 if fused else 5) * t * inter * elem_bytes


print(f"dense MLP: hidden {real.hidden_size} -> intermediate {I_DENSE}; per token in bf16: "
      f"unfused {gelu_bytes(1, I_DENSE, 2, False) / 1e3:.2f} KB in 2 launches, "
      f"fused {gelu_bytes(1, I_DENSE, 2, True) / 1e3:.2f} KB in 1")

# %% [markdown]
# **Measured.** Two things a CPU can count honestly: the launches (`profile_forward`'s dispatched ATen ops; on a GPU
# each of these two is one kernel) and the bytes. For the bytes, a `TorchDispatchMode` of a few lines sees every
# ATen op as it runs, with the tensors it takes and returns; an elementwise op reads each input once and writes its
# output once, so their sizes are its traffic. The unfused code is plain torch, cheap on a CPU even at the real
# width: 93 tokens of bf16.

# %%
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class OpBytes(TorchDispatchMode):
    """Every ATen op run inside the `with`, as (name, bytes of the tensors it takes and returns)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        self.ops.append((func.overloadpacket.__name__, sum(t.nbytes for t in tensors)))
        return out


T_GELU = 93
ggen = torch.Generator().manual_seed(9)  # this section's own inputs: `gen` keeps its stream for the cells below
gate = (3 * torch.randn(T_GELU, I_DENSE, generator=ggen)).to(DEVICE, torch.bfloat16)  # wide: σ's both branches
up = torch.randn(T_GELU, I_DENSE, generator=ggen).to(DEVICE, torch.bfloat16)
with OpBytes() as unfused_ops:
    gelu_tanh(gate) * up
prof_gelu = profile_forward(lambda: gelu_tanh(gate) * up, warmup=1)
print(f"unfused, T={T_GELU}: {prof_gelu['kernels']} launches; (op, bytes): {unfused_ops.ops}")
assert prof_gelu["kernels"] == 2
assert [name for name, _ in unfused_ops.ops] == ["gelu", "mul"]
assert sum(b for _, b in unfused_ops.ops) == gelu_bytes(T_GELU, I_DENSE, 2, fused=False)

# %% [markdown]
# ### A kernel, step 1: one program per block of elements
#
# No reduction and no neighbours: output element `i` needs `gate[i]` and `up[i]` only, so any split of the work is
# right. Flatten the `T·I` outputs, give each program `BLOCK` consecutive ones and mask the last, partial block.
# The math is fp32, with one identity, `0.5·(1 + tanh u) = σ(2u)`:
#
# $$\mathrm{gelu}_{\tanh}(x) = 0.5\,x\,(1 + \tanh u) = x\,\sigma(2u),\qquad u = \sqrt{2/\pi}\,(x + 0.044715\,x^3)$$
#
# Exact algebra, not an approximation, and it needs only `exp` (no `tanh` from CUDA's libdevice, which the
# interpreter does not have). σ is written so that `exp` never overflows: with `e = exp(−|z|)`, σ(z) is `1/(1+e)`
# for z ≥ 0 and `e/(1+e)` below. First the identity, in float64:

# %%
xs = torch.linspace(-10, 10, 20001, dtype=torch.float64)
us = math.sqrt(2 / math.pi) * (xs + 0.044715 * xs**3)
torch.testing.assert_close(xs * torch.sigmoid(2 * us), 0.5 * xs * (1 + torch.tanh(us)))
print("x·σ(2u) == 0.5·x·(1 + tanh u) on [-10, 10], to float64 rounding")

# %% [markdown]
# The kernel rounds once, at the store, through the package's `to_dtype`: Triton's interpreter *truncates*
# fp32 → bf16 where a GPU rounds to nearest even, and the helper rounds by hand under the interpreter only, so the
# CPU writes the bits a GPU would. The truth it is checked against is the model's formula in float64, and the
# tolerance is the house rule (`tests/kernels/support.py`, `assert_rounded`): every element within one rounding to
# the output's dtype of the float64 value (2⁻⁸ relative in bf16, 2⁻²⁴ in fp32), plus fp32 arithmetic's own error,
# 2·10⁻⁶ of the largest value. Outputs start as NaN, so an element the kernel never writes fails.

# %%
from gemma4lab.kernels._common import to_dtype  # fp32 -> dtype, to nearest even (by hand under the interpreter)

UNIT = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # one rounding, relative


def gelu_mul_exact(gate, up):
    """The model's formula in float64: the truth every step is checked against."""
    g, u = gate.double(), up.double()
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3))) * u


def rounding_ratio(got, exact):
    """The worst element's error in units of the house bound; at most 1 passes, NaN never does."""
    exact = exact.double()
    bound = UNIT[got.dtype] * (1 + 1e-6) * exact.abs() + 2e-6 * exact.abs().max() + 1e-30
    return ((got.double() - exact).abs() / bound).max().item()


def assert_one_rounding(got, exact):
    assert torch.isfinite(got).all(), "a non-finite element (one the kernel never wrote?)"
    assert rounding_ratio(got, exact) <= 1, f"beyond one rounding: {rounding_ratio(got, exact):.2f}x the bound"


@triton.jit
def gelu_times(g, u):
    """gelu_tanh(g) · u in fp32, as g · σ(z) · u with z = 2·√(2/π)·(g + 0.044715 g³); exp never overflows."""
    z = 2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g)  # √(2/π) = 0.79788…
    e = tl.exp(-tl.abs(z))
    return g * tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)) * u


@triton.jit
def gelu_mul_kernel(g_ptr, u_ptr, o_ptr, n_elem, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elem
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + offs, to_dtype(gelu_times(g, u), o_ptr.dtype.element_ty), mask=mask)


def gelu_mul_flat(gate, up, out, block=256):
    gelu_mul_kernel[(triton.cdiv(gate.numel(), block),)](gate, up, out, gate.numel(), BLOCK=block)
    return out


T_CPU, I_TINY = TOKENS, cfg.intermediate_size  # the tiny model's dense width: the interpreter is slow
dtypes = [dtype] + [torch.bfloat16] * (dtype != torch.bfloat16)
for dt in dtypes:
    g1 = (3 * torch.randn(T_CPU, I_TINY, generator=ggen)).to(DEVICE, dt)
    u1 = torch.randn(T_CPU, I_TINY, generator=ggen).to(DEVICE, dt)
    buf = torch.full((T_CPU + 1, I_TINY), float("nan"), device=DEVICE, dtype=dt)  # poisoned, one row to spare
    gelu_mul_flat(g1, u1, buf[:T_CPU])
    assert_one_rounding(buf[:T_CPU], gelu_mul_exact(g1, u1))
    assert buf[T_CPU].isnan().all(), "a write past the last element"
    print(f"step 1, {dt}: {T_CPU}×{I_TINY} outputs in {triton.cdiv(T_CPU * I_TINY, 256)} programs of 256 "
          f"({'the last one partial' if T_CPU * I_TINY % 256 else 'all full'}): worst element "
          f"{rounding_ratio(buf[:T_CPU], gelu_mul_exact(g1, u1)):.2f}× the bound")

# %% [markdown]
# ### Step 2: gate and up as halves of one tensor
#
# The dense MLP hands the activation two `[T, I]` tensors from two matmuls. The experts make one: their first GEMM
# multiplies by `gate_up_proj` and writes gate and up side by side, a `[rows, 2I]` tensor, and the activation reads
# its two halves: views whose rows are `2I` elements apart (the layout `bench-kernels` times, too). Step 1 assumes
# that row `t` starts at element `t·I`. **Prediction**: on the halves it gets row 0 right and every other row
# wrong.

# %%
I_EXPERT = cfg.moe_intermediate_size  # the tiny model's expert width
gu = (3 * torch.randn(T_CPU, 2 * I_EXPERT, generator=ggen)).to(DEVICE, dtype)
g_half, u_half = gu[:, :I_EXPERT], gu[:, I_EXPERT:]
print(f"gate half: shape {tuple(g_half.shape)}, row stride {g_half.stride(0)}, contiguous: {g_half.is_contiguous()}")
wrong = gelu_mul_flat(g_half, u_half, torch.empty(T_CPU, I_EXPERT, device=DEVICE, dtype=dtype))
exact_halves = gelu_mul_exact(g_half, u_half)
row_ok = [rounding_ratio(wrong[t], exact_halves[t]) <= 1 for t in range(T_CPU)]
print(f"step 1 on the halves: {sum(row_ok)} of {T_CPU} rows right (row 0: {row_ok[0]})")
assert row_ok[0] and not any(row_ok[1:])

# %% [markdown]
# Copying the halves into contiguous tensors first would fix it at the price of two more launches and `4·T·I·b`
# more bytes, more than the whole kernel moves. Instead, recover each element's row and column from its flat
# index, `row = offs // I` and `col = offs % I`, and address each tensor through its own row stride. The launch
# stays flat and unpadded whatever `I` is (2112 dense, 704 per expert: neither a power of two), and with `I` a
# compile-time constant the compiler turns `// I` and `% I` into multiplies. The row is widened to 64 bits before it
# meets a stride. The output may be a strided view too: here it is the left part of a wider poisoned buffer, whose
# spare columns must stay NaN.

# %%
@triton.jit
def gelu_mul_rows_kernel(g_ptr, u_ptr, o_ptr, n_elem, stride_g, stride_u, stride_o, INTER: tl.constexpr,
                         BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elem
    row = (offs // INTER).to(tl.int64)  # 64-bit before it meets a stride
    col = offs % INTER
    g = tl.load(g_ptr + row * stride_g + col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + col, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * stride_o + col, to_dtype(gelu_times(g, u), o_ptr.dtype.element_ty), mask=mask)


def gelu_mul_rows(gate, up, out, block=256):
    n, inter = gate.shape
    gelu_mul_rows_kernel[(triton.cdiv(n * inter, block),)](gate, up, out, n * inter, gate.stride(0), up.stride(0),
                                                           out.stride(0), INTER=inter, BLOCK=block)
    return out


for dt in dtypes:
    gu2 = (3 * torch.randn(T_CPU, 2 * I_EXPERT, generator=ggen)).to(DEVICE, dt)
    buf = torch.full((T_CPU, I_EXPERT + 8), float("nan"), device=DEVICE, dtype=dt)  # 8 spare columns per row
    gelu_mul_rows(gu2[:, :I_EXPERT], gu2[:, I_EXPERT:], buf[:, :I_EXPERT])
    assert_one_rounding(buf[:, :I_EXPERT], gelu_mul_exact(gu2[:, :I_EXPERT], gu2[:, I_EXPERT:]))
    assert buf[:, I_EXPERT:].isnan().all(), "a write outside the output view"
    g2, u2 = (3 * torch.randn(T_CPU, I_TINY, generator=ggen)).to(DEVICE, dt), torch.randn(T_CPU, I_TINY,
                                                                                          generator=ggen).to(DEVICE, dt)
    assert_one_rounding(gelu_mul_rows(g2, u2, torch.full_like(g2, float("nan"))), gelu_mul_exact(g2, u2))
print(f"step 2: the halves of [{T_CPU}, {2 * I_EXPERT}] into a strided output, and two contiguous [{T_CPU}, "
      f"{I_TINY}] tensors, each within one rounding ({', '.join(map(str, dtypes))})")

# %% [markdown]
# ### The package's kernel
#
# `gemma_gelu_tanh_and_mul(gate, up)` (the dense MLP's call) and `gemma_gelu_tanh_mul(gate_up)` (a `[rows, 2I]`
# tensor, split into its halves) launch step 2 with three more things:
#
# - `EVEN`: when the block divides `T·I`, the masks are compiled out (no predicated loads and stores);
# - `BIG`: when `T·I + BLOCK` reaches 2³¹ the flat index itself needs 64 bits, so the program id is widened first;
# - `elementwise_config`: 4096 outputs per program (8 warps, 16 elements per thread: two 16-byte bf16 vectors per
#   input), halved while there would be fewer than two programs per SM, so that a short prompt still fills the GPU;
#
# and it is registered as `torch.ops.gemma4lab.gelu_tanh_and_mul`, one op for CUDA graphs and `torch.compile`. Its
# kernel:

# %%
from gemma4lab.kernels import gelu_tanh_mul as gelu_module

print(inspect.getsource(gelu_module._gelu_tanh_mul_kernel.fn))  # .fn: the Python function under @triton.jit
for t in (1, T_GELU, 1453):
    c = K.elementwise_config(t * I_DENSE)  # no device: an H200's 132 SMs
    print(f"T={t:>5} at the dense width: block {c.block:>4}, {c.num_warps} warp(s), "
          f"{triton.cdiv(t * I_DENSE, c.block):>3} programs")

# %% [markdown]
# Checked like the steps: both wrappers, poisoned outputs, the heuristic's launch and a block that divides `T·I`
# (the `EVEN` branch). Then at the real width: one launch, and the bytes predicted for it.

# %%
print("backend:", K.kernel_backend(g1))
for dt in dtypes:
    gu3 = (3 * torch.randn(T_CPU, 2 * I_EXPERT, generator=ggen)).to(DEVICE, dt)
    out3 = torch.full((T_CPU, I_EXPERT), float("nan"), device=DEVICE, dtype=dt)
    assert_one_rounding(K.gemma_gelu_tanh_mul(gu3, out=out3), gelu_mul_exact(*gu3.chunk(2, dim=-1)))
    g3 = (3 * torch.randn(T_CPU, I_TINY, generator=ggen)).to(DEVICE, dt)
    u3 = torch.randn(T_CPU, I_TINY, generator=ggen).to(DEVICE, dt)
    even_block = math.gcd(T_CPU * I_TINY, 1024)  # the largest power of two up to 1024 that divides T·I
    for launch in (None, K.ElementwiseConfig(block=even_block, num_warps=1)):
        out3 = torch.full((T_CPU, I_TINY), float("nan"), device=DEVICE, dtype=dt)
        assert_one_rounding(K.gemma_gelu_tanh_and_mul(g3, u3, out=out3, config=launch), gelu_mul_exact(g3, u3))

out_dense = torch.full_like(gate, float("nan"))
with OpBytes() as fused_ops:
    K.gemma_gelu_tanh_and_mul(gate, up, out=out_dense)
prof_gelu_fused = profile_forward(lambda: K.gemma_gelu_tanh_and_mul(gate, up, out=out_dense), warmup=1)
print(f"fused, T={T_GELU}: {prof_gelu_fused['kernels']} launch; (op, bytes): {fused_ops.ops}")
assert prof_gelu_fused["kernels"] == 1
assert fused_ops.ops == [("gelu_tanh_and_mul", gelu_bytes(T_GELU, I_DENSE, 2, fused=True))]
assert_one_rounding(out_dense, gelu_mul_exact(gate, up))

# %% [markdown]
# One rounding is also the precision argument. Unfused in bf16, `gelu` rounds its output and the multiply rounds
# again (so does Hugging Face's code). **Prediction**: on the same bf16 inputs at the real width, the unfused code's
# worst element lies beyond one rounding of the truth, while the kernel's (just checked) does not.

# %%
exact_dense = gelu_mul_exact(gate, up)
two_roundings = rounding_ratio(gelu_tanh(gate) * up, exact_dense)
print(f"worst element, in units of one bf16 rounding's bound: kernel {rounding_ratio(out_dense, exact_dense):.2f}, "
      f"unfused {two_roundings:.2f}")
assert two_roundings > 1

# %% [markdown]
# ### Measured on an H200
#
# **Predictions.** (1) Memory-bound at large T: from a few thousand tokens on, the kernel moves its `3·T·I·2` bytes
# at more than 80 % of the copy bandwidth inside a CUDA graph. (2) At 93 tokens its bytes take less time than an
# empty kernel: latency, far from the roof. (3) The unfused code moves 5/3 of the bytes, so at the largest size,
# where launches no longer count, it takes at least 5/3 as long. `bench-kernels` timed the experts' layout
# (`gemma_gelu_tanh_mul` on `[T, 2·2112]` bf16) against the unfused code run op by op (`eager`), `torch.compile`,
# the fused call outside a graph (`triton`) and inside one (`graph`):

# %%
kernels_rec = viz.load_recorded("kernels", RESULTS)
gelu_rows = viz.kernel_rows(kernels_rec[0], "gelu_tanh_mul") if kernels_rec else []
if gelu_rows:
    doc_k, label_k = kernels_rec
    display(viz.plot_roofline(gelu_rows, "gelu_tanh_mul", label_k))
    print("\n".join(viz.kernel_lines(doc_k, ["gelu_tanh_mul"])))
    notebook.check(doc_k["config"]["shapes"]["intermediate"] == I_DENSE
                   and all(r["bytes"] == gelu_bytes(r["tokens"], I_DENSE, 2, True) for r in gelu_rows),
                   "recorded at the dense MLP's width, moving the bytes predicted here")
    notebook.check(min(r["graph_frac_copy"] for r in gelu_rows if r["tokens"] >= 2893) > 0.8,
                   f"(1) above 80 % of copy bandwidth in a graph from 2893 tokens on ({label_k})")
    first, last = gelu_rows[0], gelu_rows[-1]
    bytes_us = first["bytes"] / doc_k["roofs"]["copy_bandwidth_Bps"] * 1e6
    empty_us = doc_k["roofs"]["empty_kernel_ms"]["graph_ms"] * 1e3
    print(f"T={first['tokens']}: the bytes take {bytes_us:.2f} µs, an empty kernel {empty_us:.2f} µs, the kernel "
          f"{first['graph_ms'] * 1e3:.2f} µs in a graph")
    notebook.check(bytes_us < empty_us and first["graph_frac_copy"] < 0.5,
                   f"(2) latency-bound at {first['tokens']} tokens")
    print(f"T={last['tokens']}: unfused {last['eager_ms'] * 1e3:.0f} µs, fused {last['triton_ms'] * 1e3:.0f} µs "
          f"(both outside a graph): {last['eager_ms'] / last['triton_ms']:.1f}x")
    notebook.check(last["eager_ms"] / last["triton_ms"] >= 5 / 3, "(3) the unfused code at least 5/3 as slow")
    print(f"T={first['tokens']}, outside a graph: unfused {first['eager_ms'] * 1e3:.1f} µs, fused "
          f"{first['triton_ms'] * 1e3:.1f} µs")
    assert first["triton_ms"] > first["eager_ms"], "outside a graph the fused call loses at 93 tokens (the text)"
else:
    print("No recorded results/kernels_*.json: run `python -m gemma4lab bench-kernels` on a GPU.")

# %% [markdown]
# All three hold. The byte count is a floor for the unfused code, not a forecast: at the largest size it is slower
# than 5/3 of the kernel's time. And one thing the bytes do not see: *outside* a graph, at 93 tokens, the fused call
# loses to the two ATen launches: launching a Triton kernel from Python, through the registered op, costs the CPU
# more than launching an ATen op. The fused prefill does not pay it: the piecewise CUDA graphs (notebook 06) replay
# the launch, and inside a graph the kernel takes a couple of microseconds.
#
# Live, on this machine: on a GPU the kernel is timed here at 2893 tokens of the dense width. On a CPU it ran in
# Triton's interpreter, numpy executing one program after another; such timings say nothing about a GPU, so none
# are shown.

# %%
if DEVICE.startswith("cuda"):
    g_live = (3 * torch.randn(2893, I_DENSE, generator=ggen)).to(DEVICE, torch.bfloat16)
    u_live = torch.randn(2893, I_DENSE, generator=ggen).to(DEVICE, torch.bfloat16)
    o_live = torch.empty_like(g_live)
    bw_live = measure.copy_bandwidth(DEVICE, nbytes=2**28)
    fused_ms = measure.bench_cuda_graph(lambda: K.gemma_gelu_tanh_and_mul(g_live, u_live, out=o_live))
    unfused_ms = measure.bench(lambda: gelu_tanh(g_live) * u_live)
    print(f"live T=2893: fused {fused_ms * 1e3:.1f} µs in a graph "
          f"({gelu_bytes(2893, I_DENSE, 2, True) / (fused_ms * 1e-3) / bw_live:.0%} of copy bandwidth), unfused "
          f"eager {unfused_ms * 1e3:.1f} µs ({torch.cuda.get_device_name()})")
    notebook.check(fused_ms < unfused_ms, "live: the fused kernel in a graph beats the unfused code")
else:
    print(f"DEVICE={DEVICE}: interpreter, no timings (set DEVICE = 'cuda' on a GPU)")

# %% [markdown]
# ### The experts go one step further: the GELU in the GEMM's operand load
#
# The dense MLP uses this kernel: its matmuls are the library's, with no operand load of ours to fold anything
# into. The experts at a short prompt run their own GEMM, and do without the kernel: the down GEMM, `moe_gemm` with
# `gelu_gate=True`, takes the `[rows, 2I]` gate|up tensor itself and computes `gelu_tanh(gate) · up` on each
# `[BLOCK_M, BLOCK_K]` tile of its A operand as it loads it: step 1's arithmetic on a 2-D tile, rounded once to the
# GEMM's input dtype, then straight into `tl.dot`. The `[rows, I]` activation is never written, so its write, its
# read back by the GEMM (`2·I·b` per routed row) and one launch disappear. The operand load:

# %%
from gemma4lab.kernels import moe_gemm as gemm_module

print(inspect.getsource(gemm_module._gelu_tanh.fn))
print(inspect.getsource(gemm_module._a_tile.fn))

# %% [markdown]
# **Prediction.** On rows sorted by expert (the routing above), the folded GEMM equals this section's kernel
# followed by the plain GEMM to fp32 rounding, in one launch instead of two.

# %%
w_down = model.language_model.layers[0].experts.down_proj.detach()  # [E, H, I]
rows_gu = torch.randn(int(pkg_offsets[-1]), 2 * I_EXPERT, generator=ggen).to(DEVICE, dtype)  # sorted by expert


def folded():
    return K.gemma_moe_gemm(rows_gu, w_down, pkg_offsets, gelu_gate=True)


def two_step():
    return K.gemma_moe_gemm(K.gemma_gelu_tanh_mul(rows_gu), w_down, pkg_offsets)


rel_fold = measure.rel_err(folded(), two_step())
launches = (profile_forward(folded, warmup=1)["kernels"], profile_forward(two_step, warmup=1)["kernels"])
print(f"folded vs GELU kernel + GEMM: relative difference {rel_fold:.1e}; launches {launches[0]} vs {launches[1]}")
assert rel_fold < 1e-5 and launches == (1, 2)
saved = 2 * T_GELU * real.top_k_experts * real.moe_intermediate_size * 2
streamed = real.num_experts * real.hidden_size * real.moe_intermediate_size * 2
print(f"26B-A4B at {T_GELU} tokens, bf16: the fold saves {saved / 1e6:.1f} MB of activation traffic per layer, "
      f"beside the {streamed / 1e9:.2f} GB of down-projection weights the same GEMM streams")

# %% [markdown]
# At a short prompt the saved bytes are negligible beside the weight stream (next sections): the fold's gain there
# is a launch and a buffer. Prompts above 256 tokens take the library grouped GEMM instead
# (`Experts.MOE_GEMM_MAX_TOKENS`), where there is again nothing to fold into, so there the experts call
# `gemma_gelu_tanh_mul` on the halves of their `[rows, 2I]` tensor: step 2's case.
#
# ## The fused MoE block: four launches
#
# The token gather (`x[slot // k]`) rides on the gate|up GEMM's operand load in the same way, and the un-sort,
# weighting and sum over the `k` choices is one more pass (`moe_combine`): the whole fused block is four launches
# (route, gate|up, down with the GELU, combine). Same result as the unfused path, to fp32 rounding:

# %%
layer = model.language_model.layers[0]
x = torch.randn(TOKENS, cfg.hidden_size, generator=gen).to(DEVICE, dtype)
with torch.no_grad():
    fused = layer.experts(x, ids, weights, fused_act=True, fused_gemm=True)
    unfused = layer.experts(x, ids, weights)
rel = ((fused - unfused).norm() / unfused.norm()).item()
print(f"fused block vs unfused: relative difference {rel:.1e}")
assert rel < 1e-5

# %% [markdown]
# ## The expert GEMM is a weight stream
#
# At the real shapes (hidden 2816, expert width 704, 128 experts, top-8), both expert GEMMs of one layer read every
# expert's weights that the routing hit and only `T·k` rows of activations:

# %%
H, inter, E_real, k_real = real.hidden_size, real.moe_intermediate_size, real.num_experts, real.top_k_experts
weight_bytes = E_real * (2 * inter * H + H * inter) * 2  # gate|up and down, bf16
for t in (93, 1453):
    act_bytes = t * k_real * (H + 2 * inter + inter + H) * 2  # rows in and out of both GEMMs
    flops = 2 * t * k_real * (2 * inter * H + H * inter)
    print(f"T={t:>5}: weights {weight_bytes / 1e9:.2f} GB, activations {act_bytes / 1e6:.1f} MB, "
          f"{flops / weight_bytes:.0f} FLOP per weight byte")

# %% [markdown]
# At 93 tokens that is a few FLOP per weight byte, far below the ~200 where an H200's tensor cores, not its memory,
# become the limit (its bf16 rate over its bandwidth): the GEMM's floor is the weight bytes over the copy bandwidth,
# and a good kernel reads each weight once. Even at 1453 tokens it stays under that ridge.

# %%
rec = viz.load_recorded("prefill", RESULTS)  # the matmul rate and copy bandwidth measured on the card, same run
mm_rate, copy_bw = (rec[0]["matmul_flops"], rec[0]["copy_bandwidth_Bps"]) if rec else (790e12, 4.2e12)
ridge = mm_rate / copy_bw
intensity_93 = 2 * 93 * k_real * (2 * inter * H + H * inter) / weight_bytes
print(f"{'recorded on ' + rec[1] if rec else 'H200 leads (no recorded run)'}: {mm_rate / 1e12:.0f} TFLOP/s, "
      f"{copy_bw / 1e12:.2f} TB/s → ridge ≈ {ridge:.0f} FLOP/byte; expert GEMMs at 93 tokens: {intensity_93:.1f} "
      f"→ memory-bound, floor {weight_bytes / copy_bw * 1e3:.2f} ms per layer")
assert intensity_93 < ridge / 10
#
# ## A prediction the H200 refuted — and what rescued it
#
# `moe_gemm` gives each program one expert and one slice of output columns, and loops over the expert's rows in
# tiles of `block_m` rows *outside* its loop over K. An expert with more rows than one tile reads its weights again
# for each extra tile. **Prediction:** a tile big enough for the busiest expert (32 rows at 189 tokens, 64 at 512)
# reads the weights once and is faster than the 16-row tile from 189 tokens on. The recorded sweep (both expert
# GEMMs of one layer, every candidate setting, on an H200; solid lines: `a · wᵀ` as written, dashed: swapped):

# %%
sweep = viz.load_recorded("moe_sweep", RESULTS)
if sweep:
    doc, label = sweep
    display(viz.plot_moe_sweep(doc, f"expert GEMMs, recorded on {label}"))

    def best(t, skew, tile, swap):
        row = next(r for r in doc["rows"] if r["tokens"] == t and r["skew"] == skew)
        return min(g["ms"] for g in row["gemm"]
                   if f"block_m={tile}," in g["config"] and ("swap_ab=True" in g["config"]) == swap)

    print(f"189 tokens, uniform, a·wᵀ:     16-row tile {best(189, 1.0, 16, False):.3f} ms, "
          f"32-row tile {best(189, 1.0, 32, False):.3f} ms")
    print(f"189 tokens, uniform, swapped: 16-row tile {best(189, 1.0, 16, True):.3f} ms, "
          f"32-row tile {best(189, 1.0, 32, True):.3f} ms")
    assert best(189, 1.0, 16, False) < best(189, 1.0, 32, False), "as written, the bigger tile loses (the text)"
    assert best(189, 1.0, 32, True) < best(189, 1.0, 16, True), "swapped, the bigger tile wins (the text)"
else:
    print("No recorded results/moe_sweep_*.json: run `.ci/gpu moe-sweep` on a GPU.")

# %% [markdown]
# As written (`a · wᵀ`, the routed rows as the matrix-multiply's M side) the prediction fails: a 16-row A tile is
# a 16-row `mma.sync`, and doubling it to 32 rows doubles each program's accumulator registers and tensor-core work
# on mostly padding rows, which costs more than the re-read weights (they mostly come from the L2 cache, read again
# a moment later by the same program). The way out is to swap the operands: compute `(w · aᵀ)ᵀ`. Now the 64–128
# weight rows of a tile are the M side, which fills Hopper's warpgroup `wgmma` instruction (M = 64 per warpgroup),
# and the routed rows are its N side, where 16 or 32 columns cost nearly the same. Swapped, the 32-row tile wins
# from 189 tokens on, and at 93 tokens both GEMMs stream the weights at ~93 % of copy bandwidth. The package's
# settings (`moe_config`, one orientation, weight tile and K step per GEMM, so a row's bits never depend on the
# launch) come from this sweep, and prompts above 256 tokens go to `grouped_mm` (`Experts.MOE_GEMM_MAX_TOKENS`).

# %% [markdown]
# ## Moving the floor: FP8 experts
#
# With the swapped kernel the expert GEMMs stream at ~93 % of copy bandwidth at 93 tokens: the kernel is near its
# floor, so the next factor has to come from the floor itself. Of the ~50 GB a short prefill of 26B-A4B reads, ~45 GB
# are expert weights, and in FP8 (e4m3: a sign, 4 exponent and 3 mantissa bits) they take half the bytes.
# `gemma4lab.quantize_experts` stores each expert as e4m3 with one fp32 scale per output channel,
# `scale = max|w| / 448` (448: e4m3's largest value), and `moe_gemm` widens each FP8 tile to the activations' dtype as
# it loads it (exact: every e4m3 value is a bf16 value), accumulates in fp32 and multiplies each output by its
# channel's scale once, after the K sum — the scale factors out of it.
#
# **Predictions.** The weight floor at 93 tokens falls by almost half. A MoE block's error grows from bf16's (a few
# times 2⁻⁹ relative) to e4m3's: each weight moves by up to 2⁻⁴ of itself, so expect a few per cent.

# %%
from gemma4lab.lab.floors import floors

f16 = floors(real, 93, float(E_real), copy_bw, mm_rate)
f8 = floors(real, 93, float(E_real), copy_bw, mm_rate, expert_elem_bytes=1)
print(f"93 tokens: weights {f16['weight_bytes'] / 1e9:.1f} GB → {f8['weight_bytes'] / 1e9:.1f} GB, weight floor "
      f"{f16['weight_floor_ms']:.1f} ms → {f8['weight_floor_ms']:.1f} ms")
assert f8["weight_floor_ms"] < 0.6 * f16["weight_floor_ms"]

# %% [markdown]
# The error, teacher-forced: the same tokens, expert choices and routing weights through one MoE block of the tiny
# model, in bf16 and with FP8 experts, against its float64 truth. (Not through the whole model: a random MoE is
# chaotic, and a tiny perturbation flips near-tied expert choices somewhere downstream.)

# %%
with torch.no_grad():
    ex = layer.experts
    truth = copy.deepcopy(ex).double()(x.double(), ids, weights.double())
    err_bf16 = ((copy.deepcopy(ex).bfloat16()(x.bfloat16(), ids, weights).double() - truth).norm()
                / truth.norm()).item()
    ex8 = copy.deepcopy(ex)
    print(gemma4lab.quantize_experts(ex8))
    y8 = ex8(x, ids, weights, fused_act=True, fused_gemm=True)
    err_fp8 = ((y8.double() - truth).norm() / truth.norm()).item()
print(f"MoE block vs float64: bf16 {err_bf16:.1e}, FP8 experts {err_fp8:.1e} ({err_fp8 / err_bf16:.0f}x)")
assert 3 * err_bf16 < err_fp8 < 2**-4

# %% [markdown]
# What random weights cannot tell: trained experts have outlier weights, and one outlier stretches its channel's
# scale and coarsens every other weight of that channel. Judge FP8 on a real checkpoint before serving with it.
#
# And the time, recorded when `bench-prefill` ran its FP8 part (fused + PCG with FP8 experts, against the FP8 floor
# measured in the same run):

# %%
if rec and any("pcg_fp8_ms" in r for r in rec[0]["rows"].values()):
    print(f"recorded on {rec[1]}")
    for r in rec[0]["rows"].values():
        if "pcg_fp8_ms" in r:
            print(f"T={r['tokens']:>6}: bf16 {r['pcg_ms']:6.1f} ms ({r['pcg_ms'] / r['floor_ms']:.2f}x its floor), "
                  f"FP8 experts {r['pcg_fp8_ms']:6.1f} ms ({r['pcg_fp8_x_fp8_floor']:.2f}x the FP8 floor "
                  f"{r['fp8_floor_ms']:.1f} ms)")
else:
    print("No recorded FP8 column in results/prefill_*.json yet: run `python -m gemma4lab bench-prefill` on a GPU "
          "(its fp8 part runs last).")

# %% [markdown]
# ## Exercises
#
# Each exercise has a cell for your answer, a collapsed solution cell that fills in only what you left as `None`,
# and a check.
#
# **1. How many experts does a prompt touch?** Under uniform random routing each token picks `k` of `E` experts.
# Write `experts_hit(T, E, k)`, the expected number of distinct experts a prompt of `T` tokens touches. The check
# compares it with a simulation.

# %%
experts_hit = None  # your answer: a function (T, E, k) -> float

# %% jupyter={"source_hidden": true} tags=["solution"]
if experts_hit is None:
    def experts_hit(T, E, k):
        # an expert is missed by one token with probability 1 - k/E, by all T tokens with (1 - k/E)^T
        return E * (1 - (1 - k / E) ** T)

# %%
sim_gen = torch.Generator().manual_seed(1)
for t in (4, 93):
    picks = torch.rand(400, t, E_real, generator=sim_gen).argsort(-1)[..., :k_real]  # 400 prompts, k distinct each
    hit = torch.stack([torch.bincount(p.reshape(-1), minlength=E_real) > 0 for p in picks]).sum(-1).float().mean()
    print(f"T={t}: formula {experts_hit(t, E_real, k_real):.1f}, simulated {hit:.1f}")
    notebook.check(abs(experts_hit(t, E_real, k_real) - hit.item()) < 1.0, f"the simulation's mean at T={t}")

# %% [markdown]
# **2. How often does a 16-row tile read the weights?** With uniform routing an expert's row count is
# `Binomial(T, k/E)`; a 16-row tile reads its weights `ceil(rows / 16)` times (never, if it has
# no row). Set `reads_512` to the expected reads per expert at 512 tokens, relative to
# reading every expert once, by simulation or by formula.

# %%
reads_512 = None  # your answer: a float

# %% jupyter={"source_hidden": true} tags=["solution"]
if reads_512 is None:
    rows = torch.distributions.Binomial(512, torch.tensor(k_real / E_real)).sample((200_000,))
    reads_512 = torch.ceil(rows / 16).mean().item()

# %%
print(f"expected weight reads per expert at 512 tokens with 16-row tiles: {reads_512:.2f}")
notebook.check(abs(reads_512 - 2.45) < 0.05, "about 2.45 reads (the module docstring's figure)")

# %% [markdown]
# **3. No masks when the block divides.** The package's GELU kernel drops its masks when `BLOCK` divides `T·I`
# (`EVEN`): every program is full, and on a GPU the loads and the store need no predicates. Write
# `gelu_mul_even(gate, up, out, block)`: a kernel like step 2's without any `mask=`, launched only when `block`
# divides `T·I`, and step 2's `gelu_mul_rows` otherwise. The check runs it on an even and an uneven size, each into
# a poisoned buffer with a spare row that must stay NaN.

# %%
gelu_mul_even = None  # your answer: a function (gate, up, out, block) -> out

# %% jupyter={"source_hidden": true} tags=["solution"]
if gelu_mul_even is None:

    @triton.jit
    def gelu_mul_even_kernel(g_ptr, u_ptr, o_ptr, stride_g, stride_u, stride_o, INTER: tl.constexpr,
                             BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # every program full: nothing to mask
        row = (offs // INTER).to(tl.int64)
        col = offs % INTER
        g = tl.load(g_ptr + row * stride_g + col).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + col).to(tl.float32)
        tl.store(o_ptr + row * stride_o + col, to_dtype(gelu_times(g, u), o_ptr.dtype.element_ty))

    def gelu_mul_even(gate, up, out, block):
        n, inter = gate.shape
        if (n * inter) % block:
            return gelu_mul_rows(gate, up, out, block)
        gelu_mul_even_kernel[((n * inter) // block,)](gate, up, out, gate.stride(0), up.stride(0), out.stride(0),
                                                     INTER=inter, BLOCK=block)
        return out

# %%
ok = []
for n_rows in (16, 15):  # 16·48 = 768 = 6·128 (even); 15·48 = 720 is not
    g_ex = (3 * torch.randn(n_rows, I_EXPERT, generator=ggen)).to(DEVICE, dtype)
    u_ex = torch.randn(n_rows, I_EXPERT, generator=ggen).to(DEVICE, dtype)
    buf = torch.full((n_rows + 1, I_EXPERT), float("nan"), device=DEVICE, dtype=dtype)
    gelu_mul_even(g_ex, u_ex, buf[:n_rows], 128)
    ok.append(bool(torch.isfinite(buf[:n_rows]).all()) and rounding_ratio(buf[:n_rows], gelu_mul_exact(g_ex, u_ex)) <= 1
              and bool(buf[n_rows].isnan().all()))
notebook.check(all(ok), "one rounding at 16 and 15 rows of 48, and no write past the last row")

# %% [markdown]
# **4. When are 64-bit indices needed?** The package's kernel switches to 64-bit flat indices (`BIG`) when
# `T·I + BLOCK ≥ 2³¹`: a program's offsets run up to `T·I + BLOCK` and must fit in int32. Set `t_big(inter)` to the
# smallest row count that needs them at 4096-element blocks. The check: it is the boundary at the dense and the
# expert widths of 26B-A4B, and a prompt as long as the model's context (`max_position_embeddings`) needs `BIG` for
# neither, not even for the experts' activation, which has `T·k` rows.

# %%
t_big = None  # your answer: a function (inter) -> the smallest number of rows that needs 64-bit indices

# %% jupyter={"source_hidden": true} tags=["solution"]
if t_big is None:
    def t_big(inter, block=4096):
        return math.ceil((2**31 - block) / inter)  # the smallest T with T·inter + block >= 2**31

# %%
ctx = real.max_position_embeddings
for inter, rows_per_token in ((real.intermediate_size, 1), (real.moe_intermediate_size, real.top_k_experts)):
    t = t_big(inter)
    print(f"I={inter}: 64-bit indices from {t:,} rows = {t / rows_per_token:,.0f} tokens (context: {ctx:,})")
    notebook.check((t - 1) * inter + 4096 < 2**31 <= t * inter + 4096, f"the boundary at I={inter}")
    notebook.check(t > ctx * rows_per_token, f"a full-context prompt stays in 32 bits at I={inter}")
