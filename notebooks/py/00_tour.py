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
# ## The course
#
# | notebook | what it derives or measures | kernels (`torch.ops.gemma4lab`) |
# |---|---|---|
# | 00 · tour (this one) | the package, a model saved and loaded, one text and one image forward, generation | — |
# | 01 · RMSNorm | Gemma 4's norm, its rounding, a first Triton kernel written in the notebook | — (the lesson's own) |
# | 02 · norm + residual + scalar | one pass instead of four, bytes and bandwidth | `rmsnorm_residual_scalar` |
# | 03 · the MoE epilogue | three norms and a sum in one kernel, then the next layer's norm too | `dual_rmsnorm_residual_scalar(_next_norm)` |
# | 04 · a decoder layer | every fusion switch, launches per layer, parity | `post_attention_block`, `qkv_norm_rope_`, `router_topk`, `gelu_tanh_and_mul`, `moe_route`, `moe_gemm`, `moe_combine` |
# | 05 · launch overhead | is the CPU or the GPU the bottleneck: busy, idle, dispatch | — |
# | 06 · piecewise CUDA graphs | buckets, padding, capture, replay; the attention kernel between the pieces | `prefill_attention` |
# | 07 · end to end | a photo in, tokens out: processor, vision tower, PCG prefill, graph decode | `decode_attention` |
# | 08 · the prefill table | the full-size model against its floor and its peers | — |
# | 09 · routing and the expert GEMM | a counting sort instead of a sort, the gated GELU between the GEMMs and its fold into the expert GEMM's operand load, the weight stream, a refuted prediction and the operand swap that rescued it | `moe_route`, `gelu_tanh_and_mul`, `moe_gemm`, `moe_combine` |
# | 10 · transformers, patched in place | the speed-up on the model you already have: launches before and after, what is refused, PCG under `generate` | all of them, through `patch_transformers` |
# | 11 · the attention prologue | per-head q/k/v norms and proportional RoPE derived step by step, bytes and the floor, K-as-V | `qkv_norm_rope_` |
# | 12 · head-512 attention | the accumulator's registers, a spill predicted and measured, the output-dim split and its 1.5× work | `prefill_attention` |
# | 13 · decode at the memory limit | a step's bytes and floor, why one program per head idles the GPU, split-K and the exact log-sum-exp merge, packed GQA heads; a GEMM's fixed cost at one row, and q/k/v in one launch | `decode_attention`, `dense_gemm` |
# | 14 · the post-attention block | one residual update and three normed views in one pass, why the views come from the rounded stream | `post_attention_block` |
# | 15 · the router's tail | softmax, top-8, renormalise and scale in one launch; a launch-bound op predicted and measured, ties and NaN ids | `router_topk` |
#
# The figure below is the map the course fills in: one decoder layer as the fused prefill runs it. Grey boxes are
# library matrix products, blue ones the fused kernels the notebooks derive, orange the attention kernel; the
# green band is one *piece* — everything between two attention calls — which the piecewise CUDA graph runner
# captures once and replays.

# %%
viz.plot_decoder_layer()

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
# ## Exercises
#
# Every notebook ends with a few. Each exercise has a cell for your answer, a collapsed solution cell that fills in
# only what you left as `None` (so *Run All* checks your answer if you gave one, and the solution otherwise — that is
# how CI keeps the solutions honest), and a check, `notebook.check`, which prints a tick or stops with what the
# answer should satisfy.
#
# **1. Read the map.** Count the boxes inside the green band of the decoder-layer figure — one PCG piece, everything
# between two attention calls: how many are fused kernels of ours (blue) and how many library GEMMs (grey)? Set
# `piece_launches`; the check counts the figure's own data, `viz.DECODER_LAYER_STAGES`.

# %%
piece_launches = None  # your answer: (fused kernels, library GEMMs), two ints

# %% jupyter={"source_hidden": true} tags=["solution"]
if piece_launches is None:
    # left to right: o_proj | post_attention_block | MLP gate|up, GELU·up, MLP down | router logits, router_topk,
    # moe_route, moe_gemm twice (gate|up, then down), moe_combine | the MoE epilogue | q|k|v, q/k norms + RoPE
    piece_launches = (9, 5)

# %%
piece = [op for _, _, _, op in viz.DECODER_LAYER_STAGES if op != "prefill_attention"]  # between the attentions
fused, gemms = sum(op is not None for op in piece), sum(op is None for op in piece)
print(f"one piece: {fused} fused kernels ({len(set(piece) - {None})} distinct ops) and {gemms} library GEMMs")
notebook.check(tuple(piece_launches) == (fused, gemms), "the blue and the grey boxes of the green band")

# %% [markdown]
# **2. How long is the image prompt?** The image prompt above was 5 ids, one of them the image placeholder, and the
# photo became the number of soft tokens in the figure's title. How many tokens does the model see — how many rows do
# its logits have? Set `image_prompt_len`.

# %%
image_prompt_len = None  # your answer: an int

# %% jupyter={"source_hidden": true} tags=["solution"]
if image_prompt_len is None:
    n_soft = proc.preprocess_images(photo)["num_soft_tokens"][0]
    image_prompt_len = len(prompt) - 1 + (1 + n_soft + 1)  # the placeholder becomes [boi] + n soft tokens + [eoi]

# %%
print(f"{len(prompt)} prompt ids -> {out.logits.shape[1]} logit rows (you said {image_prompt_len})")
notebook.check(image_prompt_len == out.logits.shape[1] == batch["input_ids"].shape[1],
               "the prompt's ids with the placeholder expanded, one logit row per token")

# %% [markdown]
# **3. The first new token.** Greedy generation picks, at each step, the token with the largest logit. Without
# running `generate` again, which token does it produce first after `ids`? Compute `first_new` from `logits`, the
# text forward's output above.

# %%
first_new = None  # your answer: an int, a token id

# %% jupyter={"source_hidden": true} tags=["solution"]
if first_new is None:
    first_new = int(logits[0, -1].argmax())  # the last prompt position's logits predict the next token

# %%
print(f"generate's first new token: {int(new[0, ids.shape[1]])} (you said {first_new})")
notebook.check(first_new == int(new[0, ids.shape[1]]), "the argmax of the last prompt row's logits")

# %% [markdown]
# Next: `01_rmsnorm` opens the first kernel.
