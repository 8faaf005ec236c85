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
# # 05 · Launch overhead: is the CPU or the GPU the bottleneck?
#
# A GPU kernel launch costs the CPU a few microseconds. A Gemma 4 layer launches hundreds of kernels, so at short
# prompts the GPU finishes each kernel before the CPU has issued the next: the GPU *waits*. Fusing kernels and CUDA
# graphs both attack this, from two sides.
#
# **What you will learn**
#
# - the two numbers that decide it: CPU dispatch time and GPU busy time (`gemma4lab.profiling.profile_forward`);
# - the CPU-only proxy (dispatched ATen ops) and what it does and does not tell you;
# - recorded GPU numbers: latency vs tokens, and a per-token-count breakdown with a slider.

# %% tags=["parameters"]
DEVICE = "cpu"  # "cuda" for live GPU numbers
INTERACTIVE = True
DTYPE = "float32"
CPU_TOKENS = [4, 16, 64]  # live token counts on CPU (eager, unfused: cheap)
GPU_TOKENS = [16, 93, 189, 512, 1453]

# %%
from gemma4lab.lab import notebook

ROOT = notebook.setup(DEVICE)  # on CPU: TRITON_INTERPRET=1, before any kernel is imported
RESULTS = ROOT / "results"

# %matplotlib inline
import torch
from IPython.display import display

import gemma4lab
from gemma4lab.lab import viz
from gemma4lab.lab.profiling import profile_forward

dtype = getattr(torch, DTYPE)

# %% [markdown]
# ## The live measurement
#
# `profile_forward(fn)` runs `fn` under `torch.profiler`. On a GPU it returns the kernel count, the CPU time spent
# inside launch calls (`cpu_dispatch_ms`) and the union of kernel intervals (`gpu_busy_ms`). If dispatch ≥ busy, the
# forward is launch-bound. On CPU there are no kernels: we get the count of dispatched ATen ops, each of which would be
# at least one launch, and the wall time.

# %%
model = gemma4lab.random_init("tiny", dtype=dtype, device=DEVICE)
tokens = GPU_TOKENS if DEVICE == "cuda" else CPU_TOKENS
live = {}
for t in tokens:
    ids = [torch.randint(2, 256, (t,), generator=torch.Generator().manual_seed(t)).to(DEVICE)]
    p = profile_forward(lambda: model.prefill(ids), warmup=1)
    live[t] = {"cpu_dispatch_ms": p["cpu_dispatch_ms"], "gpu_busy_ms": p["gpu_busy_ms"], "latency_ms": p["wall_ms"],
               "kernels": p["kernels"]}
    print(f"T={t:>5}: {p['kernels']} {'kernels' if p['device'] == 'cuda' else 'ATen ops'}, wall {p['wall_ms']:.1f} ms")

# %% [markdown]
# The op count barely moves with T: launches depend on the *model*, not on the prompt. That is why the overhead
# dominates at small T and vanishes at large T, where every kernel has real work.
#
# ## Recorded on a GPU
#
# `python -m gemma4lab bench-pcg` runs a reduced-depth model at full 26B-A4B width and records, per token count, the
# latency of eager unfused, eager fused and fused + piecewise CUDA graphs, plus profiles at a few token counts.

# %%
doc, SOURCE = viz.load_recorded("pcg", RESULTS) or (None, None)
if doc is None:
    print("No recorded results/pcg_*.json yet (run `python -m gemma4lab bench-pcg` on a GPU). "
          f"Showing the live {DEVICE} measurement below instead.")
else:
    SOURCE = f"recorded: {SOURCE} · {doc.get('layers', '?')} layers"
    print(SOURCE)
    display(viz.plot_pcg_latency(doc, SOURCE))

# %% [markdown]
# ## Breakdown per token count
#
# For each token count: CPU dispatch, GPU busy, and end-to-end latency, per implementation. When dispatch is as tall
# as busy, the GPU idles between kernels. Data: recorded profiles if present (and on a GPU, the live ones), else
# the live CPU proxy (where "GPU busy" is zero by definition).

# %%
DATA, DATA_SOURCE = viz.breakdown_data(doc if DEVICE != "cuda" else None), SOURCE
if not DATA:
    DATA, DATA_SOURCE = {t: {"live": v} for t, v in live.items()}, f"live on {DEVICE}"
COUNTS = sorted(DATA)


def plot_breakdown(i):
    return viz.plot_breakdown(DATA[COUNTS[i]], COUNTS[i], DATA_SOURCE)


plot_breakdown(0)

# %% [markdown]
# Drag the slider through the token counts: at small T the dispatch bar rivals the busy bar (launch-bound); at large
# T the busy bar takes over and fusion's fewer bytes matter more than its fewer launches.

# %%
if INTERACTIVE:
    from ipywidgets import IntSlider, interact

    slider = IntSlider(value=0, min=0, max=len(COUNTS) - 1, description="count #", readout=True)
    slider.description = "token idx"
    interact(plot_breakdown, i=slider)
    print("token counts by index:", dict(enumerate(COUNTS)))
