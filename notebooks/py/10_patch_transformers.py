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
# # 10 · The speed-up on the model you already have: transformers' Gemma 4, patched in place
#
# Notebooks 01–09 built the fused kernels and the piecewise CUDA graphs on gemma4lab's own model. Most readers run
# Gemma 4 through Hugging Face transformers. `gemma4lab.patch_transformers(model)` routes that model's decoder layers
# through the same decoder program and kernels, *in place*: no weights are copied, and `generate`, the processor and
# `from_pretrained` see the same object.
#
# **What you will learn**
#
# - the three-line recipe, on a checkpoint loaded the way you load yours;
# - what changes in one forward (dispatched kernels before and after), and that the logits do not;
# - what the patch refuses rather than silently skip (a hook it would bypass), and how `unpatch` restores the model;
# - prefill through the piecewise graphs under transformers' own `generate`, and what it buys on an H200.

# %% tags=["parameters"]
DEVICE = "cpu"  # "cuda" for compiled kernels and real timings
INTERACTIVE = True
DTYPE = "float32"  # the fused MoE kernels run in fp32 under the CPU interpreter
PROMPT_TOKENS = 24
NEW_TOKENS = 8

# %%
from gemma4lab.lab import notebook

ROOT = notebook.setup(DEVICE)  # on CPU: TRITON_INTERPRET=1, before any kernel is imported
RESULTS = ROOT / "results"

# %matplotlib inline
import tempfile
import warnings
from pathlib import Path

import torch
import transformers

import gemma4lab
from gemma4lab.lab import measure, viz
from gemma4lab.lab.profiling import profile_forward

dtype = getattr(torch, DTYPE)

# %% [markdown]
# ## Your model, loaded as you load it
#
# No weights can be downloaded here, so a tiny random Gemma 4 is written with `save_pretrained` and loaded back with
# transformers' `from_pretrained` — the same call you make with a hub name or a local path.

# %%
workdir = Path(tempfile.mkdtemp(prefix="gemma4lab_10_"))
checkpoint = gemma4lab.save_pretrained(gemma4lab.random_init("tiny", dtype=torch.float32, seed=3), workdir / "tiny")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # transformers' notes about a random checkpoint
    model = transformers.Gemma4ForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype).to(DEVICE).eval()
text_cfg = model.config.text_config
print(f"{type(model).__name__}: {text_cfg.num_hidden_layers} layers, hidden {text_cfg.hidden_size}, "
      f"{text_cfg.num_experts} experts (top-{text_cfg.top_k_experts}); transformers {transformers.__version__}")
ids = torch.randint(3, 400, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0)).to(DEVICE)

# %% [markdown]
# ## Before: one forward, unpatched
#
# The profiler counts what one prefill launches: GPU kernels on a GPU; on a CPU, the dispatched operators (each one
# a kernel launch on a GPU — the count is the GPU's, the times are not).

# %%
with torch.no_grad():
    before = model(input_ids=ids, use_cache=False).logits
    prof_before = profile_forward(lambda: model(input_ids=ids, use_cache=False))
per_layer_before = prof_before["kernels"] / text_cfg.num_hidden_layers
print(f"unpatched: {prof_before['kernels']} launches per forward (~{per_layer_before:.0f} per layer)")

# %% [markdown]
# ## The patch
#
# **Prediction.** Each layer becomes gemma4lab's decoder program with every fusion on: norms and residuals in the
# epilogues, q/k/v norm + RoPE in one kernel, the router's top-k, the routing and expert GEMMs of notebook 09. The
# embedding, the final norm, the LM head and the mask construction stay transformers', so the launches per layer
# should drop by more than half, and the logits should equal the unpatched model's to fp32 rounding.

# %%
handle = gemma4lab.patch_transformers(model, fusion="all")
print(handle)
with torch.no_grad():
    after = model(input_ids=ids, use_cache=False).logits
    prof_after = profile_forward(lambda: model(input_ids=ids, use_cache=False))
per_layer_after = prof_after["kernels"] / text_cfg.num_hidden_layers
diff = (after.float() - before.float()).abs().max().item()
print(f"patched: {prof_after['kernels']} launches per forward (~{per_layer_after:.0f} per layer, was "
      f"~{per_layer_before:.0f}); largest logit difference {diff:.1e}")
assert per_layer_after < per_layer_before / 2, "the prediction: fewer than half the launches per layer"
assert diff < (1e-4 if dtype == torch.float32 else 5e-2), "the patched model computes the same function"

# %% [markdown]
# `generate` is transformers' own and sees the same object; greedy tokens should not change:

# %%
with torch.no_grad():
    tokens_patched = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
handle.unpatch()
with torch.no_grad():
    tokens_plain = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
print("patched:  ", tokens_patched[0, PROMPT_TOKENS:].tolist())
print("unpatched:", tokens_plain[0, PROMPT_TOKENS:].tolist())
assert torch.equal(tokens_patched, tokens_plain)

# %% [markdown]
# ## What it refuses
#
# The fused layer never calls the MLP module's `forward` (its math runs inside the fused kernels), so a forward
# hook there would silently stop firing. The patch refuses that, on every forward, with an error that says what
# and where, instead of skipping your hook:

# %%
hook = model.model.language_model.layers[0].mlp.register_forward_hook(lambda *_: None)
try:
    with gemma4lab.patch_transformers(model, fusion="all"):
        pass
    refused = None
except ValueError as e:
    refused = str(e)
finally:
    hook.remove()
print("\n".join(refused.splitlines()[:3]) if refused else "not refused")
assert refused is not None and "mlp" in refused

# %% [markdown]
# Hooks on the layer itself and on the projections do fire (the program calls those modules), and a `peft` LoRA
# adapter on a projection is called like any module; the tests check both.
#
# ## Prefill through the piecewise graphs
#
# `pcg=True` also routes prefill-shaped calls — `model(ids)` and the first step of `generate` — through a
# `PiecewiseCudaGraphRunner` over the patched layers, filling transformers' `DynamicCache` for the decode steps that
# follow. On a CPU the pieces run eagerly (there are no graphs); the routing and the cache are the same.

# %%
with gemma4lab.patch_transformers(model, fusion="all", pcg={"max_tokens": 64, "progress": False}) as handle:
    with torch.no_grad():
        tokens_pcg = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    stats = dict(handle.runner.stats)
print("through the runner:", tokens_pcg[0, PROMPT_TOKENS:].tolist())
print("runner stats:", stats)
assert torch.equal(tokens_pcg, tokens_plain) and stats["transformers_calls"] >= 1  # the decode steps

# %% [markdown]
# ## What it buys on an H200
#
# `bench-prefill` times transformers' model (grouped_mm experts, SDPA) unpatched, patched, and patched + PCG on the
# same full-size random weights in one run, beside gemma4lab's own model and the floor:

# %%
rec = viz.load_recorded("prefill", RESULTS)
cols = (("hf_ms", "transformers"), ("hf_patched_ms", "patched"), ("hf_patched_pcg_ms", "patched + PCG"),
        ("pcg_ms", "gemma4lab + PCG"), ("floor_ms", "floor"))
if rec and any("hf_patched_ms" in r for r in rec[0]["rows"].values()):
    doc, label = rec
    print(f"recorded on {label} (ms per prefill)")
    print(f"{'tokens':>7} " + " ".join(f"{name:>16}" for _, name in cols))
    for r in doc["rows"].values():
        print(f"{r['tokens']:>7} " + " ".join(f"{r.get(k, float('nan')):>16.1f}" for k, _ in cols))
else:
    print("No recorded transformers-patch columns in results/prefill_*.json yet: run `python -m gemma4lab "
          "bench-prefill` on a GPU.")
if DEVICE == "cuda":  # live, on this GPU, at this notebook's (tiny) size
    with gemma4lab.patch_transformers(model, fusion="all") as handle:
        live = measure.time_stats(lambda: model(input_ids=ids, use_cache=False))["median_ms"]
    plain = measure.time_stats(lambda: model(input_ids=ids, use_cache=False))["median_ms"]
    print(f"live, tiny model: unpatched {plain:.2f} ms, patched {live:.2f} ms")

# %% [markdown]
# ## Exercises
#
# Each exercise has a cell for your answer, a collapsed solution cell that fills in only what you left as `None`,
# and a check.
#
# **1. Is it patched?** Write `is_patched(model)`: True when any decoder layer of the model has an instance-level
# `forward` (that is how the patch replaces it: the class's forward is untouched). The check patches, tests, unpatches
# and tests again.

# %%
is_patched = None  # your answer: a function (model) -> bool

# %% jupyter={"source_hidden": true} tags=["solution"]
if is_patched is None:
    def is_patched(m):
        return any("forward" in layer.__dict__ for layer in m.model.language_model.layers)

# %%
with gemma4lab.patch_transformers(model, fusion="all"):
    inside = is_patched(model)
notebook.check(inside and not is_patched(model), "patched inside the with block, restored after it")

# %% [markdown]
# **2. Which attachments fire?** For each module below, predict whether a forward hook on it *fires* under the patch
# (True) or makes the patch *refuse* (False): `"self_attn.q_proj"`, `"mlp"`, `"input_layernorm"`, and the layer
# itself, `""`. Fill `fires` with your four predictions; the check tries each.

# %%
fires = None  # your answer: a dict {module path: bool}

# %% jupyter={"source_hidden": true} tags=["solution"]
if fires is None:
    # the program calls the projections (and the layer's forward is the patch itself); the norms and the MLP are
    # computed inside fused kernels, so their modules' forwards never run
    fires = {"self_attn.q_proj": True, "mlp": False, "input_layernorm": False, "": True}


# %%
def hook_fires(path: str) -> bool:
    layer = model.model.language_model.layers[0]
    target = layer.get_submodule(path) if path else layer
    seen = []
    h = target.register_forward_hook(lambda *_: seen.append(True))
    try:
        with gemma4lab.patch_transformers(model, fusion="all"), torch.no_grad():
            model(input_ids=ids[:, :8], use_cache=False)
        return bool(seen)
    except ValueError:
        return False
    finally:
        h.remove()


for path, guess in fires.items():
    got = hook_fires(path)
    print(f"hook on layers[0].{path or '(the layer)'}: {'fires' if got else 'refused'} (you said "
          f"{'fires' if guess else 'refused'})")
    notebook.check(got == guess, f"layers[0].{path or '(the layer)'}")
