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
# # 07 · End to end: a photo in, tokens out
#
# Everything together: the processor, the vision tower, the merged prompt, a piecewise-CUDA-graph prefill and a
# CUDA-graph decode loop.
#
# **What you will learn**
#
# - the path of an image: pixels → patches → soft tokens → positions in the prompt;
# - how `DecodeGraphRunner.generate(..., prefill_runner=runner)` chains PCG prefill and graph-replayed decode;
# - that the output matches `transformers` on the same checkpoint (if installed).

# %% tags=["parameters"]
DEVICE = "cpu"  # "cuda" to capture real graphs
INTERACTIVE = True
DTYPE = "float32"
NEW_TOKENS = 8
MAX_LEN = 512

# %%
from gemma4lab.lab import notebook

ROOT = notebook.setup(DEVICE)  # on CPU: TRITON_INTERPRET=1, before any kernel is imported

# %matplotlib inline
import tempfile

import matplotlib.cbook
import PIL.Image
import torch
from IPython.display import display

import gemma4lab
from gemma4lab.lab import viz
from gemma4lab.runtime import decode_graphs, pcg

dtype = getattr(torch, DTYPE)

# %% [markdown]
# ## Photo → processor
#
# The prompt holds one image placeholder; the processor expands it to `[boi] + n × [image] + [eoi]` and
# `mm_token_type_ids` marks the image tokens (they attend to each other bidirectionally).

# %%
model = gemma4lab.random_init("tiny", dtype=dtype, device=DEVICE)
cfg = model.config
with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
    photo = PIL.Image.open(f).convert("RGB")
proc = gemma4lab.Gemma4Processor(cfg)
batch = proc(input_ids=[2, 10, cfg.image_token_id, 11, 12], images=[photo])
batch = {k: v.to(DEVICE) for k, v in batch.items()}
ids = batch["input_ids"]
n_img = int((ids == cfg.image_token_id).sum())
print(f"prompt: {ids.shape[1]} tokens, of which {n_img} image soft tokens")

viz.plot_prompt_tokens(photo, ids.cpu(), cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id)

# %% [markdown]
# ## Vision tower → merged embeddings
#
# The tower turns the patches into soft tokens, the projector maps them into the text width, and
# `embed_inputs` scatters them into the placeholder rows.

# %%
feats = model.image_features(batch["pixel_values"], batch["image_position_ids"])
embeds = model.embed_inputs(ids[0], batch["pixel_values"], batch["image_position_ids"])
print("soft tokens:", tuple(feats.shape), "→ merged prompt embeddings:", tuple(embeds.shape))

# %% [markdown]
# ## PCG prefill + graph decode
#
# The prefill runner pads the prompt to a bucket; images replay the same graphs as text (the soft tokens go into a
# static buffer selected by a mask). The decode runner owns a static KV cache that the prefill fills.

# %%
n = ids.shape[1]
runner = gemma4lab.PiecewiseCudaGraphRunner(model, buckets=[pcg.default_buckets(n)[-1]], progress=False)
print(runner.capture())
decoder = decode_graphs.DecodeGraphRunner(model, max_batch=1, max_len=MAX_LEN, progress=False)
out = decoder.generate(ids, NEW_TOKENS, pixel_values=batch["pixel_values"],
                       image_position_ids=batch["image_position_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                       prefill_runner=runner)
ours = out[0, n:].tolist()
eager = model.generate(ids, NEW_TOKENS, batch["pixel_values"], batch["image_position_ids"],
                       batch["mm_token_type_ids"])[0, n:].tolist()
print("PCG + decode graphs:", ours)
print("eager generate:     ", eager, "| equal:", ours == eager)
assert ours == eager, "graph generation must give the eager model's tokens"

# %% [markdown]
# ## Parity with transformers
#
# The same weights saved as a Hugging Face checkpoint and loaded by `transformers` (a test-only dependency: this
# cell is skipped without it). Greedy tokens must agree.

# %%
try:
    import transformers
except ImportError:
    transformers = None
    print("transformers not installed: skipping the reference comparison")
if transformers is not None:
    tmp = tempfile.mkdtemp(prefix="gemma4lab_")
    gemma4lab.save_pretrained(model, tmp)
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" widget left in the saved notebook
    hf = transformers.Gemma4ForConditionalGeneration.from_pretrained(tmp, dtype=dtype).to(DEVICE).eval()
    with torch.no_grad():
        ref = hf.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=[1], pad_token_id=0)
    ref_new = ref[0, n:].tolist()
    mine = decoder.generate(ids, NEW_TOKENS, pixel_values=batch["pixel_values"],
                            image_position_ids=batch["image_position_ids"],
                            mm_token_type_ids=batch["mm_token_type_ids"], prefill_runner=runner,
                            eos_token_id=[1], pad_token_id=0)[0, n:].tolist()
    print(f"transformers {transformers.__version__}:", ref_new)
    print("gemma4lab:            ", mine, "| equal:", ref_new == mine)
    assert ref_new == mine, "greedy tokens must match transformers"

# %% [markdown]
# ## How fast does it decode?
#
# Decode reads every active weight once per step for very little math, so its floor is bytes over bandwidth: the
# non-expert weights, the experts the batch touches and the KV cache its attention sees. `python -m gemma4lab
# bench-decode` measures the full-size model at batch 1–16 and three context lengths, eager and through the decode
# graph, against that floor from the same run. On a GPU this cell also times the tiny model live: the graph's step
# against the eager step, per token.

# %%
RESULTS = ROOT / "results"
rec = viz.load_recorded("decode", RESULTS)
if rec:
    doc, label = rec
    display(viz.plot_decode(doc, label))
    one = doc["rows"].get("1x512")
    if one:
        print(f"recorded, batch 1, context 512: graph {one['graph']['step_ms']:.1f} ms per token "
              f"({one['graph']['x_floor']:.1f}× its {one['floor_ms']:.2f} ms floor), eager {one['eager']['step_ms']:.1f} ms")
        assert one["graph"]["step_ms"] < one["eager"]["step_ms"], "the graph removes the launch gaps of a step"
else:
    print("No recorded results/decode_*.json: run `python -m gemma4lab bench-decode` on a GPU.")
if DEVICE == "cuda":
    from gemma4lab.lab import measure

    kw = dict(pixel_values=batch["pixel_values"], image_position_ids=batch["image_position_ids"],
              mm_token_type_ids=batch["mm_token_type_ids"])
    graph_ms = measure.bench(lambda: decoder.generate(ids, NEW_TOKENS, prefill_runner=runner, **kw)) / NEW_TOKENS
    eager_ms = measure.bench(lambda: model.generate(ids, NEW_TOKENS, batch["pixel_values"],
                                                    batch["image_position_ids"], batch["mm_token_type_ids"]))
    print(f"live, tiny model: {graph_ms:.2f} ms per token with graphs (prefill included, amortised), "
          f"{eager_ms / NEW_TOKENS:.2f} ms eager")

# %% [markdown]
# ## Exercises
#
# Each exercise has a cell for your answer, a collapsed solution cell that fills in only what you left as `None`
# (so *Run All* checks your answer if you gave one, and the solution otherwise — that is how CI keeps the solutions
# honest), and a check.
#
# **1. How many soft tokens?** The processor scales an image, keeping its aspect ratio, so that its area is the
# budget's `max_soft_tokens · 9` patches of 16×16 px, then floors each side to a multiple of 48 px: one soft token
# is a 3×3 block of patches (`pooling_kernel_size`), 48×48 px of the resized image. The photo above became `n_img`
# soft tokens under this config's budget, `proc.max_soft_tokens`. Predict the soft tokens of a 1920×1080 video frame
# at the budgets 70 and 280 (the reference's default) and set `soft_tokens`. *Hint:* with `f = √(budget · 48² /
# (H · W))`, the resized image is `⌊f·H / 48⌋ × ⌊f·W / 48⌋` blocks — does the budget get used up?

# %%
soft_tokens = None  # your answer: a dict {budget: soft tokens} for the budgets 70 and 280

# %% jupyter={"source_hidden": true} tags=["solution"]
if soft_tokens is None:
    import math

    def blocks(budget, height=1080, width=1920, side=48):
        f = math.sqrt(budget * side**2 / (height * width))  # scale the area to the budget's blocks
        return math.floor(f * height / side) * math.floor(f * width / side)  # then floor each side to a block

    soft_tokens = {budget: blocks(budget) for budget in (70, 280)}  # each side floored: under the budget

# %%
frame = PIL.Image.new("RGB", (1920, 1080))  # PIL sizes are (width, height); only the size matters here
got = {b: gemma4lab.Gemma4Processor(cfg, max_soft_tokens=b).preprocess_images(frame)["num_soft_tokens"][0]
       for b in (70, 280)}
print(f"1920×1080 frame: the processor gives {got} soft tokens by budget (you said {soft_tokens})")
notebook.check(soft_tokens == got, "the processor's count at each budget: ⌊f·H/48⌋·⌊f·W/48⌋ blocks")

# %% [markdown]
# **2. Who sees whom?** A key is visible to a query when: same prompt AND (causal: k ≤ q, OR both in the same image,
# on sliding layers only) AND (on sliding layers: k > q − window) — `gemma4lab.attention.rule`. In this tiny config
# the window, `cfg.text.sliding_window`, is much shorter than the image. Find the prompt rows of the first and last
# image soft token (`image_rows`), then predict for both layer types whether the first sees the last and whether
# the last sees the first (`sees`). The check asks `Visibility`, the rule every attention backend derives its masks
# from, and the Triton kernel's form of it, the per-row end of the visible keys.

# %%
image_rows = None  # your answer: (first, last), two prompt rows
sees = None  # your answer: {"sliding": (first sees last, last sees first), "full": (first sees last, last sees first)}

# %% jupyter={"source_hidden": true} tags=["solution"]
if image_rows is None:
    rows = (ids[0] == cfg.image_token_id).nonzero().flatten().tolist()
    image_rows = (rows[0], rows[-1])
if sees is None:
    first, last = image_rows
    sees = {"sliding": (True,  # one image: its tokens see each other both ways, and a later key is never too far
                        first > last - cfg.text.sliding_window),  # but looking back, the window still holds
            "full": (False, True)}  # full layers are causal, images included

# %%
from gemma4lab.attention import Visibility, image_block_ids

block = image_block_ids(batch["mm_token_type_ids"][0].cpu())  # image id per row, -1 for text
img = (block >= 0).nonzero().flatten().tolist()
notebook.check(tuple(image_rows) == (img[0], img[-1]), "the rows whose mm_token_type_ids mark an image")
first, last = image_rows
got = {}
for layer, sliding in (("sliding", True), ("full", False)):
    rule = Visibility.for_layer(cfg.text, sliding)
    got[layer] = tuple(bool(rule.visible(torch.tensor(q), torch.tensor(k), q_block=block[q], k_block=block[k]))
                       for q, k in ((first, last), (last, first)))
key_end = Visibility.for_layer(cfg.text, True).key_end(block)  # the Triton kernel's form, window applied apart
print(f"window {cfg.text.sliding_window}, image rows {img[0]}..{img[-1]}: {got} (you said {sees}); "
      f"on sliding layers row {first}'s keys end before row {int(key_end[first])}")
notebook.check({layer: tuple(pair) for layer, pair in sees.items()} == got,
               "what Visibility says for both pairs on both layer types")
notebook.check(int(key_end[first]) == last + 1, "the kernel's form: the first image row's keys run to the image's end")

# %% [markdown]
# **3. Which bucket?** The runner above was given one bucket of exactly this prompt's length, so nothing was padded.
# A server captures the default buckets once for every prompt (`pcg.default_buckets()`: 4–32 in steps of 4, 48–256
# in steps of 16, 288–512 in steps of 32, …, up to 8192) and replays the smallest one that holds the prompt. Which
# bucket would this prompt of `n` tokens replay, and what fraction of its rows would be padding? Set `padded`.

# %%
padded = None  # your answer: (bucket, padding fraction), an int and a float

# %% jupyter={"source_hidden": true} tags=["solution"]
if padded is None:
    bucket = min(b for b in pcg.default_buckets() if b >= n)
    padded = (bucket, (bucket - n) / bucket)  # the padding rows run every piece's GEMMs for nothing

# %%
server = gemma4lab.PiecewiseCudaGraphRunner(model, progress=False)  # the default buckets; nothing captured yet
want, waste = server.bucket_for(n), server.padding_waste([n])[0]
print(f"{n} tokens -> bucket {want}, {waste:.1%} padding (you said {padded[0]}, {padded[1]:.1%})")
notebook.check(padded[0] == want and abs(padded[1] - waste) < 1e-9, "the smallest default bucket >= n, and its "
               "padding rows over its size")
