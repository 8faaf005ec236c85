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

import torch
import triton
import triton.language as tl
from IPython.display import display

import gemma4lab
import gemma4lab.kernels as K
from gemma4lab.lab import viz
from gemma4lab.lab.profiling import profile_forward

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
# so CUDA graphs and `torch.compile` see one op. Its kernel:

# %%
from gemma4lab.kernels import moe_route as route_module

print(inspect.getsource(route_module._moe_route_kernel.fn))  # .fn: the Python function under @triton.jit
pkg_offsets, pkg_slots, pkg_position = K.gemma_moe_route(ids, E)
assert torch.equal(pkg_offsets, want_offsets) and torch.equal(pkg_slots, want_slots)
prof_fused = profile_forward(lambda: K.gemma_moe_route(ids, E), warmup=1)
print(f"fused: {prof_fused['kernels']} launch, against {prof['kernels']} unfused")

# %% [markdown]
# The token gather (`x[slot // k]`) then rides on the expert GEMM's operand load, and the un-sort, weighting and
# sum over the `k` choices is one more pass (`moe_combine`): the whole fused block is four launches. Same result as
# the unfused path, to fp32 rounding:

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
real = gemma4lab.Gemma4Config.preset("26b-a4b").text
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
