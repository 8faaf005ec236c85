# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
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
# # 06 · Piecewise CUDA graphs for prefill
#
# A CUDA graph replays a recorded stream of kernels with a single launch: the CPU overhead of notebook 05 goes away.
# But attention cannot be recorded once for all prompts (its masks and cost depend on the real lengths), so the
# forward is cut *at attention*, and the pieces in between are recorded per token-count *bucket*.
#
# **What you will learn**
#
# - where the forward is split, and why everything between the cuts is safe to pad;
# - the default buckets and what padding costs;
# - that a replay equals the eager forward, and that a prompt above the largest bucket falls back loudly;
# - recorded capture time, graph memory and latency on a GPU.

# %% tags=["parameters"]
DEVICE = "cpu"  # "cuda" to capture real graphs
INTERACTIVE = True
DTYPE = "float32"
TOKENS = 13  # a prompt length that is not a bucket
BUCKETS = [8, 16, 32]

# %%
import os
from pathlib import Path

if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton reads it when kernels are decorated: set before import

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "pyproject.toml").exists())
RESULTS = ROOT / "results"

# %matplotlib inline
import warnings

import matplotlib.pyplot as plt
import torch

import gemma4lab
from gemma4lab import measure, pcg

dtype = getattr(torch, DTYPE)

# %% [markdown]
# ## The split
#
# With L layers there are L + 1 pieces: `embed → layer 0 pre-attention`, then `layer i-1 post-attention → layer i
# pre-attention`, and finally `layer L-1 post-attention → final norm`. Every op in a piece is row-wise, so padded rows
# never reach a real token; attention runs eagerly on the real rows only.

# %%
model = gemma4lab.random_init("tiny", dtype=dtype, device=DEVICE)
L = model.config.text.num_hidden_layers
print(f"{L} layers → {L + 1} pieces per bucket:")
print("  piece 0: embed → layer 0 pre-attention")
for i in range(1, L):
    print(f"  attention {i - 1} (eager)  ·  piece {i}: layer {i - 1} post-attention → layer {i} pre-attention")
print(f"  attention {L - 1} (eager)  ·  piece {L}: layer {L - 1} post-attention → final norm")

# %% [markdown]
# ## Buckets and padding waste
#
# A prompt of n tokens runs the graphs of the smallest bucket ≥ n. The default buckets step finely where padding
# would be a large fraction (4–32 in steps of 4) and coarsely where it would not.

# %%
buckets = pcg.default_buckets()
print(len(buckets), "buckets:", buckets[:12], "...", buckets[-4:])
sizer = pcg.PiecewiseCudaGraphRunner(model, buckets=buckets[:40], progress=False)  # small buffers on CPU
ns = list(range(1, sizer.max_tokens + 1))
waste = sizer.padding_waste(ns)
fig, ax = plt.subplots(figsize=(7, 3.2))
ax.plot(ns, waste)
ax.set(xscale="log", xlabel="prompt tokens", ylabel="padding fraction", title="padding waste, default buckets")
ax.grid(True, which="both", alpha=0.3)
plt.show()
del sizer

# %% [markdown]
# ## Capture and replay
#
# On CPU `capture()` records nothing and says so; the runner then executes the *same* pieces with the same padding
# eagerly, so the logic is tested everywhere.

# %%
runner = gemma4lab.PiecewiseCudaGraphRunner(model, buckets=BUCKETS, progress=False)
print(runner.capture())
ids = torch.randint(2, 256, (1, TOKENS), generator=torch.Generator().manual_seed(0))
ids = ids.to(DEVICE)
eager = model(ids).logits
replay = runner(ids).logits
print(f"T={TOKENS} → bucket {runner.bucket_for(TOKENS)}; max |replay - eager| = "
      f"{(replay - eager).abs().max().item():.2e}; stats {runner.stats}")

# %% [markdown]
# ## Above the largest bucket: a loud fallback
#
# Silently running eager would hide a misconfigured server. The runner warns once and counts every fallback.

# %%
big = torch.randint(2, 256, (1, BUCKETS[-1] + 5)).to(DEVICE)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    runner(big)
for w in caught:
    print("warning:", w.message)
print("eager fallbacks:", runner.stats["eager_fallbacks"])

# %% [markdown]
# ## Recorded on a GPU: what capture costs and what it buys

# %%
doc = next((d for d in (measure.read_json(p) for p in sorted(RESULTS.glob("pcg_*.json"))) if d), None)
if doc is None:
    print("No recorded results/pcg_*.json yet: run `python -m gemma4lab bench-pcg` on a GPU.")
else:
    e, cap = doc.get("environment", {}), doc.get("capture", {})
    label = (f"{e.get('card', '?')} · torch {e.get('torch', '?')} · triton {e.get('triton', '?')} · "
             f"{str(e.get('date_utc', '?'))[:10]} · {doc.get('layers', '?')} layers at full width")
    print("recorded:", label)
    if cap:
        print(f"capture: {cap.get('buckets')} buckets × {cap.get('pieces_per_bucket')} pieces in "
              f"{cap.get('capture_s', 0):.1f} s; graph pool {cap.get('graph_pool_bytes', 0) / 2**30:.2f} GiB; "
              f"static buffers {cap.get('static_buffer_bytes', 0) / 2**30:.2f} GiB")
    rows = sorted(doc["rows"].values(), key=lambda r: r["tokens"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, lab in (("eager_unfused_ms", "eager, unfused"), ("eager_fused_ms", "eager, fused"),
                     ("pcg_fused_ms", "fused + PCG")):
        pts = [(r["tokens"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=lab)
    ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms per forward", title=label)
    ax.title.set_fontsize(8)
    ax.legend()
    plt.show()
if DEVICE == "cuda":
    for n in (TOKENS, BUCKETS[-1]):
        x = ids[:, :n] if n <= TOKENS else big[:, :n]
        print(f"live T={n}: eager {measure.bench(lambda: model(x)):.2f} ms, PCG {measure.bench(lambda: runner(x)):.2f} ms")
