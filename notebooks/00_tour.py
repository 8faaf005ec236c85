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
# # 00 · A tour of gemma4lab
#
# gemma4lab is Gemma 4 (26B-A4B, a vision-language mixture-of-experts model) written as readable PyTorch, plus the
# two things that make its *prefill* fast: fused Triton kernels and piecewise CUDA graphs. Every notebook runs on a
# laptop CPU with a tiny random model; set `DEVICE = "cuda"` to get live GPU numbers instead of recorded ones.
#
# **What you will learn**
#
# - how the repo is laid out and what runs where (CPU vs GPU);
# - how to build a tiny random model, save it as a Hugging Face-layout checkpoint and load it back;
# - one text forward, one image forward through `Gemma4Processor`, and greedy generation.

# %% tags=["parameters"]
DEVICE = "cpu"  # "cuda" for live GPU numbers
INTERACTIVE = True
DTYPE = "float32"
TOKENS = 16  # prompt length
NEW_TOKENS = 8

# %%
from gemma4lab.lab import notebook

ROOT = notebook.setup(DEVICE)  # on CPU: TRITON_INTERPRET=1, before any kernel is imported

# %matplotlib inline
import os
import tempfile

import torch

import gemma4lab
from gemma4lab.lab import viz

dtype = getattr(torch, DTYPE)
print("repo root:", ROOT)

# %% [markdown]
# ## What runs where
#
# | piece | module | CPU | GPU |
# |---|---|---|---|
# | model (text decoder, vision tower) | `gemma4lab.model` (`decoder`, `text`, `vision`) | eager PyTorch | eager PyTorch |
# | fused kernels | `gemma4lab.kernels` | Triton **interpreter** (`TRITON_INTERPRET=1`) or torch reference | compiled Triton |
# | piecewise CUDA graphs | `gemma4lab.runtime.pcg` | same split, padding and caching, run eagerly | captured graphs |
# | measurements | `gemma4lab.lab.measure`, `lab.profiling` | op counts, `perf_counter` | CUDA events, kernel traces |
#
# Numbers measured on a GPU live in `results/*.json`; the notebooks show them, labelled with the card and date.
#
# ## A tiny model, saved and loaded
#
# `random_init("tiny")` builds the real architecture at toy sizes. `save_pretrained` writes the same file layout
# and parameter names as Hugging Face's checkpoint, so `load_pretrained` is exactly what you would use on real weights.

# %%
model = gemma4lab.random_init("tiny", dtype=dtype, device=DEVICE)
t = model.config.text
print(f"{t.num_hidden_layers} layers, hidden {t.hidden_size}, vocab {t.vocab_size}, "
      f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")

tmpdir = tempfile.mkdtemp(prefix="gemma4lab_tiny_")
gemma4lab.save_pretrained(model, tmpdir)
print(sorted(os.listdir(tmpdir)))
loaded = gemma4lab.load_pretrained(tmpdir, dtype=dtype, device=DEVICE)

# %% [markdown]
# ## One text forward
#
# The forward takes the reference's batch API: `input_ids [B, T]` → `.logits [B, T, vocab]`. The loaded model must
# reproduce the original bit for bit: loading is a plain copy by name, with no renaming table.

# %%
gen = torch.Generator().manual_seed(0)
ids = torch.randint(2, 256, (1, TOKENS), generator=gen).to(DEVICE)
logits = model(ids).logits
print("logits", tuple(logits.shape), "| max |original - loaded| =",
      (logits - loaded(ids).logits).abs().max().item())

# %% [markdown]
# ## One image
#
# `Gemma4Processor` resizes the photo (keeping its aspect ratio) to a patch grid, and expands every image
# placeholder token in the prompt into `[begin-of-image] + n soft tokens + [end-of-image]`. The model's vision tower
# turns the patches into those n soft tokens and scatters them into the prompt's embeddings.

# %%
import matplotlib.cbook
import PIL.Image

with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
    photo = PIL.Image.open(f).convert("RGB")

proc = gemma4lab.Gemma4Processor(model.config)
prompt = [2, 100, model.config.image_token_id, 101, 102]
batch = proc(input_ids=prompt, images=[photo])
for k, v in batch.items():
    print(f"{k:>20}: {tuple(v.shape)} {v.dtype}")

viz.plot_photo_tokens(photo, int((batch["input_ids"] == model.config.image_token_id).sum()))

# %%
batch = {k: v.to(DEVICE) for k, v in batch.items()}
out = model(**batch)
print("image prompt logits:", tuple(out.logits.shape))

# %% [markdown]
# ## Greedy generation
#
# `generate` prefills the prompt into a KV cache, then decodes one token at a time. Random weights produce random
# tokens, of course: the point is the plumbing, which the parity tests check against `transformers`.

# %%
new = model.generate(ids, NEW_TOKENS)
print("prompt:", ids[0].tolist())
print("output:", new[0, ids.shape[1]:].tolist())

# %% [markdown]
# Next: `01_rmsnorm` opens the first kernel.
