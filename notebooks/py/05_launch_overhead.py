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
# # 05 · Launch overhead: is the CPU or the GPU the bottleneck?
#
# A GPU kernel launch costs the CPU a few microseconds. A Gemma 4 layer launches hundreds of kernels, so at short
# prompts the GPU finishes each kernel before the CPU has issued the next: the GPU *waits*. Fusing kernels and CUDA
# graphs both attack this, from two sides.
#
# **What you will learn**
#
# - the number that decides it: how long the GPU sits idle, latency − GPU busy time (the profiler gives busy
#   time, `gemma4lab.lab.measure` the latency);
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
from gemma4lab.lab import measure, viz
from gemma4lab.lab.profiling import profile_forward

dtype = getattr(torch, DTYPE)

# %% [markdown]
# ## The live measurement
#
# `profile_forward(fn)` runs `fn` under `torch.profiler`. On a GPU it returns the kernel count, the CPU time spent
# inside launch calls (`cpu_dispatch_ms`) and the union of kernel intervals (`gpu_busy_ms`). The latency we time
# separately with `measure.bench` (the profiler itself slows the host down, so its wall time is not the latency).
# The forward is launch-bound when the GPU is **idle** for a large share of it: idle = latency − busy. Comparing
# dispatch with busy is not enough: the CPU also spends time *between* launch calls (Python, tensor bookkeeping),
# so a forward can dispatch for less time than the GPU is busy and still leave the GPU waiting most of the time.
# On CPU there are no kernels: we get the count of dispatched ATen ops, each of which would be at least one launch.

# %%
model = gemma4lab.random_init("tiny", dtype=dtype, device=DEVICE)
tokens = GPU_TOKENS if DEVICE == "cuda" else CPU_TOKENS
live = {}
for t in tokens:
    ids = [torch.randint(2, 256, (t,), generator=torch.Generator().manual_seed(t)).to(DEVICE)]
    p = profile_forward(lambda: model.prefill(ids), warmup=1)
    live[t] = viz.breakdown_entry(p, measure.bench(lambda: model.prefill(ids), device=DEVICE))
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
# ## The gaps, kernel by kernel
#
# The busy/idle split is a sum; a timeline shows *where* the GPU waits. One forward per implementation at the
# smallest recorded token count, every kernel a bar at its start time coloured by family: in eager mode the white
# space between bars is the GPU waiting for the CPU to launch the next kernel; inside a CUDA graph the bars sit
# almost edge to edge, and what gaps remain are the graph's own per-kernel scheduling (about a microsecond each) and
# the attention calls between the pieces.

# %%
timelines = {}
if doc is not None:
    t0 = min(int(k.rsplit("_", 1)[1]) for k in doc["profiles"])
    timelines = {name: doc["profiles"][f"{name}_{t0}"] for name in ("eager_unfused", "eager_fused", "pcg_fused")
                 if "timeline" in doc["profiles"].get(f"{name}_{t0}", {})}
if timelines:
    display(viz.plot_timeline(timelines, f"{SOURCE}, {t0} tokens: the first 3 ms of each forward", window_ms=3.0))
elif DEVICE == "cuda":
    model.set_fusion("none")
    ids = [torch.randint(2, 256, (93,), generator=torch.Generator().manual_seed(0)).to(DEVICE)]
    timelines["eager_unfused"] = profile_forward(lambda: model.prefill(ids), timeline=True)
    model.set_fusion("all")
    timelines["eager_fused"] = profile_forward(lambda: model.prefill(ids), timeline=True)
    display(viz.plot_timeline(timelines, f"live on {DEVICE}, 93 tokens (tiny model)"))
else:
    print("The recorded results/pcg_*.json predates kernel timelines: record one with `python -m gemma4lab bench-pcg` "
          "on a GPU (a CPU run has no kernels to draw, and interpreter timings say nothing about GPU gaps).")

# %% [markdown]
# ### How wide is a wait?
#
# Idle time has two very different sources, and their widths tell them apart. Inside a CUDA graph the GPU schedules
# the next node itself: the **prediction** (`docs/perf_notes.md`, "Inside the graphs") is a gap of about a
# microsecond per kernel. Everything the host does between graph replays — the eager attention calls between the
# pieces, the setup before the first piece (id checks, the packed batch), the LM head after the last — shows up as
# gaps of tens to hundreds of microseconds. A histogram of the gap widths on a log axis separates the two
# populations; `gemma4lab.lab.profiling.timeline_gaps` (which every benchmark profile now records) also names the
# kernel after each wide gap.

# %%
if "pcg_fused" in timelines:
    display(viz.plot_gaps(timelines, f"{SOURCE}, {t0} tokens: the gaps between kernels, one forward each"))
    graph_gaps = viz.gap_widths_us(timelines["pcg_fused"])
    narrow = sorted(w for w in graph_gaps if w < 5.0)
    wide_ms = sum(w for w in graph_gaps if w >= 5.0) / 1e3
    print(f"fused + PCG: {len(narrow)} gaps under 5 µs (median {narrow[len(narrow) // 2]:.2f} µs, "
          f"{sum(narrow) / 1e3:.2f} ms in all), {len(graph_gaps) - len(narrow)} wider ones ({wide_ms:.2f} ms)")
    notebook.check(narrow[len(narrow) // 2] < 2.0, "a gap inside a graph is about a microsecond (the prediction)")
    notebook.check(wide_ms > sum(narrow) / 1e3, "most of the graphed forward's idle time is host work between and "
                   "around the graphs, not the graphs' own scheduling")
elif timelines:
    display(viz.plot_gaps(timelines, f"live on {DEVICE}: the gaps between kernels, one forward each"))
else:
    print("No kernel timeline to measure gaps on (see the cell above).")

# %% [markdown]
# On the recorded H200 forward the graph's own gaps are well under the predicted microsecond, and nearly all of the
# idle time sits in a few dozen wide gaps outside the graphs. That decides the next step: fewer kernels per piece
# would save little; the host work around the graphs (or capturing attention too, so there is less of it) is the
# lever.

# %% [markdown]
# ## Breakdown per token count
#
# For each token count and implementation: a stacked bar of GPU busy + GPU idle (their sum is the latency), beside
# the CPU's time inside launch calls. The labels count kernels apart from launch calls: a CUDA graph runs many
# kernels per launch. Data: recorded profiles if present (and on a GPU, the live ones), else the live CPU proxy
# (where "GPU busy" is zero by definition).

# %%
DATA, DATA_SOURCE = viz.breakdown_data(doc if DEVICE != "cuda" else None), SOURCE
if not DATA:
    DATA, DATA_SOURCE = {t: {"live": v} for t, v in live.items()}, f"live on {DEVICE}"
COUNTS = sorted(DATA)


def plot_breakdown(tokens):
    return viz.plot_breakdown(DATA[tokens], tokens, DATA_SOURCE)


plot_breakdown(COUNTS[0])

# %% [markdown]
# Drag the slider through the token counts: at small T the idle part dominates eager latency — the GPU waits on the
# CPU — and graphs remove most of it; at large T the busy part takes over and fusion's fewer bytes matter more than
# its fewer launches. The recorded data checks the point made above: eager fused at the smallest token count
# dispatches for *less* time than the GPU is busy, yet the GPU is idle most of the time.

# %%
if doc is not None and DEVICE != "cuda":
    ef = viz.breakdown_data(doc)[min(viz.breakdown_data(doc))]["eager_fused"]
    print(f"eager fused: dispatch {ef['cpu_dispatch_ms']:.1f} ms, busy {ef['gpu_busy_ms']:.1f} ms, latency "
          f"{ef['latency_ms']:.1f} ms → GPU idle {ef['idle_ms'] / ef['latency_ms']:.0%} of the time")
    assert ef["cpu_dispatch_ms"] < ef["gpu_busy_ms"] and ef["idle_ms"] > 0.5 * ef["latency_ms"]

# %%
if INTERACTIVE:
    from ipywidgets import SelectionSlider, interact

    interact(plot_breakdown, tokens=SelectionSlider(options=COUNTS, value=COUNTS[0], description="tokens"))

# %% [markdown]
# ## Exercises
#
# Each exercise has a cell for your answer, a collapsed solution cell that fills in only what you left as `None`,
# and a check.
#
# **1. Predict the launches.** The recorded runs use a model of `doc["layers"]` layers. How many CUDA-graph launches
# does one fused + PCG prefill make? (One graph per piece; where are the cuts?) Set `graph_launches`, then the check
# compares it with the profile recorded on the GPU.

# %%
graph_launches = None  # your answer: an int

# %% jupyter={"source_hidden": true} tags=["solution"]
if graph_launches is None and doc is not None:
    graph_launches = doc["layers"] + 1  # a cut at every attention call: before the first, between each, after the last

# %%
if doc is None:
    print("no recorded results/pcg_*.json: this exercise needs a GPU run of `bench-pcg`")
else:
    recorded = {k: v["graph_launches"] for k, v in doc["profiles"].items() if k.startswith("pcg_")}
    print("recorded graph launches per prefill:", recorded)
    notebook.check(all(n == graph_launches for n in recorded.values()), "one graph launch per piece")

# %% [markdown]
# **2. Where does eager fused time go at the smallest recorded size?** From the recorded breakdown, compute the
# fraction of eager fused latency during which the GPU does nothing (`idle_fraction`, between 0 and 1).

# %%
idle_fraction = None  # your answer: a float

# %% jupyter={"source_hidden": true} tags=["solution"]
if idle_fraction is None and doc is not None:
    smallest = viz.breakdown_data(doc)[min(viz.breakdown_data(doc))]["eager_fused"]
    idle_fraction = (smallest["latency_ms"] - smallest["gpu_busy_ms"]) / smallest["latency_ms"]

# %%
if doc is not None:
    ef = viz.breakdown_data(doc)[min(viz.breakdown_data(doc))]["eager_fused"]
    notebook.check(abs(idle_fraction - ef["idle_ms"] / ef["latency_ms"]) < 0.01,
                   f"idle = latency − busy, over latency ({ef['idle_ms'] / ef['latency_ms']:.0%} recorded)")
