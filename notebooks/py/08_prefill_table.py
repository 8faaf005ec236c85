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
# # 08 · The prefill table
#
# The claim this repo checks: on Gemma 4 26B-A4B, fused kernels plus piecewise CUDA graphs roughly halve prefill
# latency at short prompts. Here are the published numbers beside ours.
#
# **What you will learn**
#
# - the published reference (sglang PR #24048) and how to read it;
# - our recorded full-size results (`results/prefill_*.json`), with the card and date they were measured on;
# - where each implementation sits against the hardware floor.

# %% tags=["parameters"]
DEVICE = "cpu"  # this notebook only reads recorded results; a full-size run needs `python -m gemma4lab bench-prefill`
INTERACTIVE = True
DTYPE = "bfloat16"

# %%
from gemma4lab.lab import notebook

ROOT = notebook.setup(DEVICE)  # on CPU: TRITON_INTERPRET=1, before any kernel is imported
RESULTS = ROOT / "results"

# %matplotlib inline
import math

from gemma4lab.lab import viz

# %% [markdown]
# ## Published (sglang PR #24048)
#
# Baseline vs fused kernels + piecewise CUDA graphs, ms per prefill. The PR does not state the GPU; the ~ values are
# read off its text as approximate.

# %%
PUBLISHED = {93: (35.6, 16.5), 189: (35.4, 17.1), 1453: (36.3, 25.1), 2893: (40.6, 30.6), 5773: (49.0, 41.6),
             11533: (70.0, 66.4)}
APPROX = {5773, 11533}
print(f"{'tokens':>7} {'baseline':>9} {'fused+PCG':>10} {'speedup':>8}")
for t, (b, f) in PUBLISHED.items():
    print(f"{t:>7} {('~' if t in APPROX else '') + f'{b:.1f}':>9} {f:>10.1f} {b / f:>7.2f}×")

# %% [markdown]
# Note the flat baseline from 93 to 1453 tokens: ~36 ms whatever the prompt length. That is the signature of a
# launch-bound forward (notebook 05): the GPU waits on the CPU. Removing the launches exposes the real work.
#
# ## Ours (recorded)

# %%
doc, LABEL = viz.load_recorded("prefill", RESULTS) or (None, None)
COLS = tuple(key for key, _, _ in viz.PREFILL_SERIES)
rows = sorted(doc.get("rows", {}).values(), key=lambda r: r["tokens"]) if doc else []
if doc is None:
    print("No recorded results/prefill_*.json yet: run `python -m gemma4lab bench-prefill` on a GPU with the "
          "full checkpoint. Only the published numbers are shown.")
else:
    LABEL += f" · transformers {doc.get('environment', {}).get('transformers', '?')}"
    print("recorded:", LABEL)
    fmt = lambda v: f"{v:.1f}" if isinstance(v, (int, float)) and math.isfinite(v) else "—"
    print(f"{'tokens':>7} " + " ".join(f"{c[:-3]:>8}" for c in COLS))
    for r in rows:
        print(f"{r['tokens']:>7} " + " ".join(f"{fmt(r.get(c)):>8}" for c in COLS))

# %%
viz.plot_prefill(PUBLISHED, rows, LABEL)

# %% [markdown]
# `floor_ms` is the larger of two roofs at that token count: reading every active weight once at the card's copy
# bandwidth, and the matmul FLOPs at its measured matmul rate. Nothing can beat it; the gap between an
# implementation and the floor is what is left to win. Cards differ: compare *ratios* against the published table,
# not absolute milliseconds.

# %% [markdown]
# ## Exercises
#
# Each exercise has a cell for your answer, a collapsed solution cell that fills in only what you left as `None`,
# and a check against the recorded run.
#
# **1. Where is the floor weight-bound?** Below some prompt length the floor is the weight stream (every active
# weight read once), above it the matmul FLOPs. From the recorded rows (`floor_ms`, `weight_floor_ms`,
# `compute_floor_ms`), set `crossover` to the smallest recorded token count whose floor is compute-bound.

# %%
crossover = None  # your answer: a token count from the table

# %% jupyter={"source_hidden": true} tags=["solution"]
if crossover is None and rows:
    crossover = min(r["tokens"] for r in rows if r["compute_floor_ms"] > r["weight_floor_ms"])

# %%
if rows:
    compute_bound = [r["tokens"] for r in rows if r["compute_floor_ms"] > r["weight_floor_ms"]]
    print("compute-bound floors at:", compute_bound)
    notebook.check(crossover == min(compute_bound), "the first recorded length whose FLOPs outweigh its weight bytes")

# %% [markdown]
# **2. Which peer to beat?** The headline compares fused + PCG with the *best* peer of the same run, not with the
# slowest. Set `best_peer_93` to the column name (`"hf"`, `"hf_compile"` or `"hf_compile_ro"`) of the fastest
# transformers configuration at the smallest recorded prompt.

# %%
best_peer_93 = None  # your answer: a column name

# %% jupyter={"source_hidden": true} tags=["solution"]
if best_peer_93 is None and rows:
    peers = {c: rows[0][f"{c}_ms"] for c in ("hf", "hf_compile", "hf_compile_ro") if rows[0].get(f"{c}_ms")}
    best_peer_93 = min(peers, key=peers.get)

# %%
if rows and rows[0].get("best_peer"):
    notebook.check(best_peer_93 == rows[0]["best_peer"], f"the run's own best peer at {rows[0]['tokens']} tokens")
