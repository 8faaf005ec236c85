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
# # 12 · Head-512 attention: why the accumulator spills, and how splitting the output dims fixes it
#
# At long prompts attention is the largest cost of a Gemma 4 prefill, and most of it is the five *full* layers,
# whose heads are 512 wide — twice what FlashAttention kernels are usually tuned for. PyTorch's fused SDPA kernels
# refuse head 512 outright. This notebook works out, from registers and FLOPs, which tile shapes can work, makes a
# prediction, checks it against a recorded H200 sweep, and shows the trick the package's kernel uses
# (`AttentionConfig.dv_splits`): two programs share one query tile, each producing half of the output dims.
#
# **What you will learn**
#
# - where the online-softmax accumulator lives and what it costs in registers per thread;
# - why a 128-row query tile at head 512 spills, and a 64-row tile does not but reuses K and V half as much;
# - the output-dim split: its extra FLOPs (1.5× at two splits) against the K/V traffic it saves;
# - that the split is exact — the same softmax, only the `PV` product divided — checked here on the CPU.

# %% tags=["parameters"]
DEVICE = "cpu"  # "cuda" for compiled kernels
INTERACTIVE = True
DTYPE = "float32"
TOKENS = 40

# %%
from gemma4lab.lab import notebook

ROOT = notebook.setup(DEVICE)  # on CPU: TRITON_INTERPRET=1, before any kernel is imported
RESULTS = ROOT / "results"

# %matplotlib inline
import torch
from IPython.display import display

from gemma4lab.kernels import AttentionConfig, gemma_prefill_attention, gemma_prefill_attention_ref
from gemma4lab.lab import measure, viz

dtype = getattr(torch, DTYPE)
torch.set_grad_enabled(False)

# %% [markdown]
# ## The online softmax keeps one tile of the output in registers
#
# A FlashAttention program owns `BLOCK_M` query rows of one head. It walks over the keys `BLOCK_N` at a time:
# scores `S = Q Kᵀ` (`[BLOCK_M, BLOCK_N]`), a running max and sum per row, probabilities `P`, and
# `acc ← acc · rescale + P V`. The accumulator `acc` is `[BLOCK_M, D]` in fp32 and stays in registers for the whole
# walk — that is the point: the output is written once. Its size per thread is the first thing to check:
#
# `acc registers per thread = BLOCK_M · D / dv_splits / (32 · num_warps)`
#
# Hopper gives a thread at most 255 registers, and the scores, `P`, the row statistics and addresses need room too.
# Past roughly 200 for the accumulator alone, the compiler spills to local memory (L1/L2 traffic in the inner loop).

# %%
def acc_regs(block_m, d, dv_splits, num_warps):
    return block_m * d // dv_splits // (32 * num_warps)


for bm, dv, w in ((64, 1, 8), (128, 1, 8), (128, 2, 8), (64, 1, 4), (128, 1, 16)):
    print(f"BLOCK_M {bm:>3}, D 512, dv_splits {dv}, {w:>2} warps: {acc_regs(bm, 512, dv, w):>3} accumulator "
          "registers per thread")

# %% [markdown]
# **Prediction.** With 8 warps, a 128-row tile at head 512 needs 256 accumulator registers per thread: it must
# spill, and run several times slower than its neighbours. A 64-row tile fits (128) but each K/V tile it loads
# serves half as many query rows, so it moves twice the K/V bytes per FLOP. Two programs per 128-row tile, each with
# half the output dims (`dv_splits = 2`), fit (128 registers) *and* keep 128 rows of reuse — at the price of both
# computing the full `QKᵀ`. (16 warps on one unsplit 128-row tile would fit the accumulator too; the recorded sweep
# did not try it — a measurement to make on your own GPU with `bench-attention --sweep`.)
#
# useful FLOPs per visible query–key pair: `2D` (scores) + `2D` (PV) = `4D`; with `s` splits each program computes
# `2D + 2D/s`, so the work is `s · (2D + 2D/s) / 4D` = 1.5× at `s = 2`.

# %%
def split_work(s):
    return s * (2 + 2 / s) / 4


print(f"work relative to the useful FLOPs: 1 split {split_work(1):.2f}x, 2 splits {split_work(2):.2f}x, "
      f"4 splits {split_work(4):.2f}x")

# %% [markdown]
# ## The split is exact
#
# Each program of a split computes the same scores, the same running max and sum, so its half of the output is
# what the unsplit program would have written there (up to the order of the fp32 sums inside a tensor-core tile). On the CPU the interpreter runs the package's kernel
# with and without the split on a tiny full-layer shape (two query heads per KV head, causal, one packed prompt), and
# both are checked against a float64 reference:

# %%
gen = torch.Generator().manual_seed(0)
HQ, HKV, D = 4, 2, 64
q, k, v = (torch.randn(TOKENS, h, D, generator=gen).to(DEVICE, dtype) for h in (HQ, HKV, HKV))
cu = torch.tensor([0, TOKENS], dtype=torch.int32, device=DEVICE)
truth = gemma_prefill_attention_ref(q.double(), k.double(), v.double(), cu)
outs = {}
for splits in (1, 2, 4):
    cfg = AttentionConfig(block_m=16, block_n=16, num_warps=4, num_stages=1, dv_splits=splits)
    outs[splits] = gemma_prefill_attention(q, k, v, cu, TOKENS, config=cfg)
    err = measure.rel_err(outs[splits], truth)
    print(f"dv_splits {splits}: relative error against float64 {err:.1e}")
    assert err < (1e-5 if dtype == torch.float32 else 1e-2)
for splits in (2, 4):  # the same softmax; only the PV product is divided between programs
    torch.testing.assert_close(outs[splits], outs[1], rtol=1e-6, atol=1e-6) if dtype == torch.float32 else None

# %% [markdown]
# ## Measured: the recorded H200 tile sweep
#
# `bench-attention --sweep` timed every candidate tile of the full layers at 11 533 tokens (bf16, 16 query heads,
# 2 KV heads of 512; TFLOP/s of useful work). Hatched bars are the settings the register count above predicts to
# spill (more than 200 accumulator registers per thread):

# %%
def predicted_spill(r):
    return acc_regs(r["block_m"], 512, r["dv_splits"], r["num_warps"]) > 200


sweep = None
for path in sorted((RESULTS / "runs").glob("attention_sweep_*.json")):
    doc = measure.read_json(path)
    if doc and any(r["layer"] == "full" for r in doc.get("sweep") or []):
        sweep = doc
if sweep:
    label = viz.env_label(sweep)
    display(viz.plot_attention_sweep(sweep, f"full layers (head 512), 11 533 tokens — recorded on {label}",
                                     predicted_spill=predicted_spill))
    full = [r for r in sweep["sweep"] if r["layer"] == "full"]
    spilled = [r["tflops"] for r in full if predicted_spill(r)]
    rest = sorted((r["tflops"] for r in full if not predicted_spill(r)), reverse=True)
    best = max(full, key=lambda r: r["tflops"])
    print(f"predicted to spill: {[round(x) for x in spilled]} TFLOP/s; the others' best three: "
          f"{[round(x) for x in rest[:3]]}")
    print(f"best: {best['block_m']}×{best['block_n']}, dv_splits {best['dv_splits']}: {best['tflops']:.0f} TFLOP/s")
    notebook.check(max(spilled) < 0.5 * rest[0], "every predicted spill runs at under half the best setting")
    notebook.check(best["dv_splits"] == 2 and best["block_m"] == 128, "the best setting splits a 128-row tile")
else:
    print("No recorded results/runs/attention_sweep_*.json: run `python -m gemma4lab bench-attention --sweep` on a "
          "GPU.")

# %% [markdown]
# The prediction holds: the 128-row unsplit tile runs at ~59 TFLOP/s, under a third of its split twin, and the best
# setting is the 128-row tile split in two (~240 TFLOP/s of useful work, i.e. ~360 TFLOP/s of tensor-core work with
# the 1.5× recomputation). The package's default (`attention_config`) is that setting.
#
# **What it leaves.** A third of the tensor-core work is the recomputed `QKᵀ`. FlashAttention-3 and FlashMLA avoid
# it on Hopper by computing `QKᵀ` once per tile and sharing `P` between two consumer warpgroups through shared memory,
# each accumulating half the output dims — the same split, inside one program. Triton 3.6 cannot express that
# sharing directly; it is the open attention issue of this repository.
#
# ## Exercises
#
# Each exercise has a cell for your answer, a collapsed solution cell that fills in only what you left as `None`,
# and a check.
#
# **1. The sliding layers.** Sliding layers have heads of 256. How many accumulator registers per thread does a
# 128-row tile with 8 warps need there, without a split? Set `sliding_regs`; the check also asks whether that fits.

# %%
sliding_regs = None  # your answer: an int

# %% jupyter={"source_hidden": true} tags=["solution"]
if sliding_regs is None:
    sliding_regs = acc_regs(128, 256, 1, 8)

# %%
print(f"128-row tile, head 256, 8 warps: {sliding_regs} accumulator registers per thread")
notebook.check(sliding_regs == 128 and sliding_regs <= 200, "128, so the sliding layers need no split")

# %% [markdown]
# **2. Four splits.** With `dv_splits = 4` each accumulator is a quarter as large, so a 256-row tile would fit.
# What is the total work relative to the useful FLOPs? Set `work_4`.

# %%
work_4 = None  # your answer: a float

# %% jupyter={"source_hidden": true} tags=["solution"]
if work_4 is None:
    work_4 = 4 * (2 + 2 / 4) / 4  # four programs, each the full QKᵀ (2D) and a quarter of PV (2D/4), over 4D

# %%
print(f"four splits: {work_4:.2f}x the useful FLOPs")
notebook.check(abs(work_4 - 2.5) < 1e-9, "2.5x: the recomputed scores now cost more than the useful work")
