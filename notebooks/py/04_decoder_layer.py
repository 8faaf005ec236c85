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
# # 04 · Fusions inside a decoder layer
#
# The kernels of notebooks 01–03 each replace a stretch of one decoder layer. `gemma4lab.Fusion` has one switch per
# kernel and `model.set_fusion(...)` applies them to the whole model.
#
# **What you will learn**
#
# - which switch replaces which stretch of the layer;
# - how the launches per layer fall as fusions are switched on (transformers, unfused, each fusion, all);
# - that the fused model's logits match the unfused one's.

# %% tags=["parameters"]
DEVICE = "cpu"  # "cuda" for live kernel counts
INTERACTIVE = True
DTYPE = "float32"
TOKENS = 8  # fused kernels run under the CPU interpreter: keep it small
GPU_TOKENS = 512

# %%
from gemma4lab.lab import notebook

ROOT = notebook.setup(DEVICE)  # on CPU: TRITON_INTERPRET=1, before any kernel is imported

# %matplotlib inline
import dataclasses

import torch

import gemma4lab
from gemma4lab.lab import viz
from gemma4lab.lab.profiling import profile_forward

dtype = getattr(torch, DTYPE)
T = GPU_TOKENS if DEVICE == "cuda" else TOKENS

# %% [markdown]
# ## The switches

# %%
print(gemma4lab.Fusion.__doc__)

# %% [markdown]
# ## Launches per layer
#
# We profile one forward per configuration: unfused, each switch alone (`next_norm` needs `epilogue`), and all.
# On a GPU these are kernel launches. On CPU they are dispatched ATen ops, each of which would be at least one
# kernel; a fused-kernel call counts once, however many tensor ops the Triton interpreter needs to emulate it (the
# wrappers mark their calls with a `gemma4lab::` profiler range). Run with `DEVICE = "cuda"` for real launch counts,
# or see the recorded `launches_per_layer` in `results/pcg_*.json` (notebook 05). One switch is not a fusion:
# `branches` runs the dense MLP on a second CUDA stream beside the experts, so it saves time, not launches (its bar
# stays at the unfused count; notebook 13 measures what it saves).

# %%
model = gemma4lab.random_init("tiny", dtype=dtype, device=DEVICE)
L = model.config.text.num_hidden_layers
# ids below 256: the top of the tiny vocabulary holds the image/video/audio placeholders
ids = torch.randint(2, 256, (1, T), generator=torch.Generator().manual_seed(0)).to(DEVICE)

configs = {"unfused": gemma4lab.Fusion()}
for f in dataclasses.fields(gemma4lab.Fusion):
    kw = {f.name: True, **({"epilogue": True} if f.name == "next_norm" else {})}
    configs["+".join(kw) if len(kw) > 1 else f.name] = gemma4lab.Fusion(**kw)
configs["all"] = gemma4lab.Fusion.all()

per_layer, logits = {}, {}
for name, fusion in configs.items():
    model.set_fusion(fusion)
    summary = profile_forward(lambda: model(ids), warmup=0)
    per_layer[name] = summary["kernels"] / L
    if name in ("unfused", "all"):
        logits[name] = model(ids).logits
    print(f"{name:>22}: {per_layer[name]:6.1f} per layer")

# %% [markdown]
# For comparison, the `transformers` reference on the same checkpoint (it is a test-only dependency: skipped if not
# installed).

# %%
try:
    import tempfile

    import transformers

    tmp = tempfile.mkdtemp(prefix="gemma4lab_")
    gemma4lab.save_pretrained(model, tmp)
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" widget left in the saved notebook
    hf = transformers.Gemma4ForConditionalGeneration.from_pretrained(tmp, dtype=dtype).to(DEVICE).eval()
    with torch.no_grad():
        hf_summary = profile_forward(lambda: hf(input_ids=ids, use_cache=False), warmup=0)
    per_layer = {"transformers": hf_summary["kernels"] / L, **per_layer}
    print(f"transformers {transformers.__version__}: {per_layer['transformers']:.1f} per layer")
except ImportError as e:
    print("transformers not installed, skipping the reference bar:", e)

# %%
viz.plot_launches(per_layer, DEVICE, T)

# %% [markdown]
# The whole-model counts include embedding, attention, experts' matmuls and the head, which no fusion touches: the
# fused kernels remove the *small* elementwise ops around them. That is exactly the part that is launch-bound at
# short prompts, and what notebook 05 measures.
#
# ## Parity
#
# Same weights, fusions on vs off. In float32 the only difference is the order of floating-point operations.

# %%
diff = (logits["all"] - logits["unfused"]).abs().max().item()
print(f"max |fused - unfused| logits = {diff:.2e} (scale {logits['unfused'].abs().max().item():.1f})")
print("same greedy tokens:", torch.equal(logits["all"].argmax(-1), logits["unfused"].argmax(-1)))
_ = model.set_fusion("none")  # assigned, so the cell does not print the whole model

# %% [markdown]
# ## Exercises
#
# Each exercise has a cell for your answer, a collapsed solution cell that fills in only what you left as `None`
# (so *Run All* checks your answer if you gave one, and the solution otherwise), and a check.
#
# **1. The biggest single saver.** Before you look at the bars: which one switch removes the most launches per layer
# on this device? Then read it off `per_layer` (a dict of launches per layer by configuration) and set
# `biggest_saver` to the switch's name.

# %%
biggest_saver = None  # your answer: a Fusion field name, e.g. "gelu"

# %% jupyter={"source_hidden": true} tags=["solution"]
if biggest_saver is None:
    singles = [f.name for f in dataclasses.fields(gemma4lab.Fusion) if f.name in per_layer]
    biggest_saver = max(singles, key=lambda name: per_layer["unfused"] - per_layer[name])

# %%
savings = {f.name: per_layer["unfused"] - per_layer[f.name] for f in dataclasses.fields(gemma4lab.Fusion)
           if f.name in per_layer}
print("launches saved per layer, each switch alone:", {k: round(v, 1) for k, v in savings.items()})
notebook.check(savings.get(biggest_saver) == max(savings.values()), "the switch with the largest saving")

# %% [markdown]
# **2. Do the savings add up?** If every switch saved the same launches alone as together, `all` would need
# `unfused − Σ savings` launches per layer. Compute that prediction as `if_additive`, compare it with the measured
# `per_layer["all"]`, and say to yourself why they differ (*hint:* can two switches remove the same launch?
# `next_norm` is left out of the sum: it was only measured together with `epilogue`).

# %%
if_additive = None  # your answer: a float

# %% jupyter={"source_hidden": true} tags=["solution"]
if if_additive is None:
    if_additive = per_layer["unfused"] - sum(savings.values())
# Where `all` needs more launches than this, the savings overlap: two switches each remove some of the same
# launches alone (each fused kernel takes over a whole stretch, and neighbouring stretches share their glue), so
# together they save less than the sum; `next_norm` then saves a little on top of `epilogue`.

# %%
print(f"if the savings added up: {if_additive:.1f} per layer; measured with every switch on: {per_layer['all']:.1f}")
notebook.check(abs(if_additive - (per_layer["unfused"] - sum(savings.values()))) < 1e-9,
               "unfused minus the sum of the single-switch savings")
