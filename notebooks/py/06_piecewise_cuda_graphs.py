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
from gemma4lab.lab import notebook

ROOT = notebook.setup(DEVICE)  # on CPU: TRITON_INTERPRET=1, before any kernel is imported
RESULTS = ROOT / "results"

# %matplotlib inline
import warnings

import torch
from IPython.display import display

import gemma4lab
from gemma4lab.lab import measure, viz
from gemma4lab.runtime import pcg

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
sizer = pcg.PiecewiseCudaGraphRunner(model, buckets=buckets, progress=False)  # sizes only: nothing is captured
ns = list(range(1, sizer.max_tokens + 1))
waste = sizer.padding_waste(ns)
del sizer
viz.plot_padding_waste(ns, waste, title=f"padding waste, all {len(buckets)} default buckets (up to {buckets[-1]} tokens)")

# %% [markdown]
# ## Capture and replay
#
# On CPU `capture()` records nothing and says so; the runner then executes the *same* pieces with the same padding
# eagerly, so the logic is tested everywhere.

# %%
runner = gemma4lab.PiecewiseCudaGraphRunner(model, buckets=BUCKETS, progress=False)
report = runner.capture()
print(report)
ids = torch.randint(2, 256, (1, TOKENS), generator=torch.Generator().manual_seed(0))
ids = ids.to(DEVICE)
eager = model(ids).logits
replay = runner(ids).logits
rel = ((replay - eager).norm() / eager.norm()).item()
print(f"T={TOKENS} → bucket {runner.bucket_for(TOKENS)}; ‖replay − eager‖/‖eager‖ = {rel:.1e}; stats {runner.stats}")
assert rel <= (1e-5 if dtype == torch.float32 else 1e-2), "padding changed a real token's output"

# %% [markdown]
# Why the bound depends on the dtype: padding changes a matmul's row count (13 → 16 here), and cuBLAS (or the CPU
# BLAS) may pick another blocking for another shape, which reorders float32 sums — a difference at rounding level,
# never one of data (the test suite fills the padding with garbage to prove that). For the fused bfloat16 model
# (`model.set_fusion("all")`, as served) the GPU tests require bit-identity (`torch.equal`) at every bucket boundary.

# %% [markdown]
# ## Above the largest bucket: chunked prefill through the same graphs
#
# A prompt longer than the largest bucket is cut into bucket-sized chunks. Each chunk replays its bucket's captured
# pieces; between them, attention reads the keys of the earlier chunks from the KV cache (a sliding layer only the
# last `window` of them) and the chunk's own keys causally, so the result is the unchunked prefill's up to
# rounding. The runner says so once and counts it; only what it cannot chunk (several long prompts at once, an
# image longer than a chunk) falls back to eager, loudly.

# %%
big = torch.randint(2, 256, (1, BUCKETS[-1] + 5), generator=torch.Generator().manual_seed(1)).to(DEVICE)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    chunked = runner(big)
for w in caught:
    print("warning:", w.message)
print("chunked prefills:", runner.stats["chunked_prefills"], "| eager fallbacks:", runner.stats["eager_fallbacks"])
whole = model(big).logits
err = ((chunked.logits - whole).norm() / whole.norm()).item()
print(f"chunked through the graphs vs one eager prefill: relative difference {err:.1e}")
assert runner.stats["chunked_prefills"] >= 1 and runner.stats["eager_fallbacks"] == 0
assert err < (1e-4 if dtype == torch.float32 else 3e-2), "chunking must not change the logits beyond rounding"

# %% [markdown]
# ## Recorded on a GPU: what capture costs and what it buys

# %%
doc, label = viz.load_recorded("pcg", RESULTS) or (None, None)
if doc is None:
    print("No recorded results/pcg_*.json yet: run `python -m gemma4lab bench-pcg` on a GPU.")
else:
    cap = doc.get("capture", {})
    label += f" · {doc.get('layers', '?')} layers at full width"
    print("recorded:", label)
    if cap:
        print(f"capture: {cap.get('buckets')} buckets × {cap.get('pieces_per_bucket')} pieces in "
              f"{cap.get('capture_s', 0):.1f} s; graph pool {cap.get('graph_pool_bytes', 0) / 2**30:.2f} GiB; "
              f"static buffers {cap.get('static_buffer_bytes', 0) / 2**30:.2f} GiB")
    display(viz.plot_pcg_speedup(doc, label))  # 05 drew these runs as latencies; here, what the graphs buy
if DEVICE == "cuda":
    for n in (TOKENS, BUCKETS[-1]):
        x = ids[:, :n] if n <= TOKENS else big[:, :n]
        print(f"live T={n}: eager {measure.bench(lambda: model(x)):.2f} ms, PCG {measure.bench(lambda: runner(x)):.2f} ms")

# %% [markdown]
# ## Between the pieces: the attention kernel
#
# Attention stays eager: it needs the real token count and the prompt boundaries, which a graph would freeze. On a
# GPU it is our Triton kernel (`gemma4lab.kernels.gemma_prefill_attention`): one launch for all packed prompts,
# with every mask written as one integer per row (`key_end`: `row + 1` for text, the end of its image for an image
# soft token) plus the sliding window. Here it runs on the same real rows as the model (on CPU: under Triton's
# interpreter) and is checked against the float64 reference.

# %%
from gemma4lab.kernels import gemma_prefill_attention, gemma_prefill_attention_ref  # noqa: E402

cfg = model.config.text
lengths = [5, TOKENS]
g = torch.Generator().manual_seed(1)
qa = torch.randn(sum(lengths), cfg.num_attention_heads, cfg.head_dim, generator=g).to(DEVICE)
ka, va = (torch.randn(sum(lengths), cfg.num_key_value_heads, cfg.head_dim, generator=g).to(DEVICE) for _ in "kv")
cu = torch.tensor([0, *lengths], device=DEVICE).cumsum(0).to(torch.int32)
got = gemma_prefill_attention(qa, ka, va, cu, max(lengths), window=cfg.sliding_window)
ref = gemma_prefill_attention_ref(qa.double(), ka.double(), va.double(), cu, window=cfg.sliding_window)
rel = ((got.double() - ref).norm() / ref.norm()).item()
print(f"sliding layer, prompts {lengths}: ‖kernel − float64‖/‖float64‖ = {rel:.1e}")
assert rel <= (1e-5 if qa.dtype == torch.float32 else 1e-2)

# %% [markdown]
# Recorded at full size: TFLOP/s over the visible query–key pairs, against FlexAttention and the best SDPA backend
# that runs (`python -m gemma4lab bench-attention`).

# %%
rec = viz.load_recorded("attention", RESULTS)
if rec is None:
    print("No recorded results/attention_*.json yet: run `python -m gemma4lab bench-attention` on a GPU.")
else:
    doc, label = rec
    display(viz.plot_attention(doc["rows"], label, doc.get("matmul_tflops")))

# %% [markdown]
# ## Exercises
#
# Each exercise has a cell for your answer, a collapsed solution cell that fills in only what you left as `None`
# (so *Run All* checks your answer if you gave one, and the solution otherwise — that is how CI keeps the solutions
# honest), and a check.
#
# **1. Buckets that waste less than 10 %.** The default buckets pad some prompts above 64 tokens by almost 20 %
# (the plot above). Write `my_buckets`: sorted bucket sizes such that every prompt of 64 to 1024 tokens is padded
# by less than 10 % of its bucket, with at most 30 buckets. *Hint:* a prompt one token above bucket `b` lands in
# the next bucket `b'`; what ratio `b' / b` keeps its padding under 10 %?

# %%
my_buckets = None  # your answer: a sorted list of ints, the last one 1024

# %% jupyter={"source_hidden": true} tags=["solution"]
if my_buckets is None:
    # padding of n = b + 1 tokens in bucket b' is (b' − b − 1) / b' < 1 − b / b', under 0.1 when b' <= b / 0.9:
    # a geometric ladder with ratio 1 / 0.9, rounded down, reaches 1024 in 28 steps
    my_buckets, b = [], 64
    while b < 1024:
        my_buckets.append(b)
        b = max(b + 1, int(b / 0.9))
    my_buckets.append(1024)

# %%
lengths = list(range(64, 1025))
worst = max(pcg.PiecewiseCudaGraphRunner(model, buckets=my_buckets, progress=False).padding_waste(lengths))
print(f"{len(my_buckets)} buckets, worst padding {worst:.1%} over prompts of 64-1024 tokens")
notebook.check(len(my_buckets) <= 30 and worst < 0.10, "at most 30 buckets, every prompt of 64-1024 tokens "
               f"padded by < 10 % (got {len(my_buckets)} buckets, worst {worst:.1%})")

# %% [markdown]
# **2. What a bucket costs.** Every bucket holds its own captured graphs, and the graphs of all buckets share one
# memory pool sized by the largest. Predict, before reading it off the runner, how many pieces one bucket captures
# for this model — one piece per stretch between attention calls — and set `pieces_per_bucket`.

# %%
pieces_per_bucket = None  # your answer: an int

# %% jupyter={"source_hidden": true} tags=["solution"]
if pieces_per_bucket is None:
    pieces_per_bucket = model.config.text.num_hidden_layers + 1  # before layer 0's attention, between each, after the last

# %%
captured = runner.piece_graphs(BUCKETS[0])  # the graphs themselves on a GPU; none on CPU
notebook.check(pieces_per_bucket == report.pieces_per_bucket and (not captured or len(captured) == pieces_per_bucket),
               f"{model.config.text.num_hidden_layers} layers cut at each attention call")
