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
# # 13 · Decode at the memory limit: split-K attention and the log-sum-exp merge
#
# Prefill multiplies thousands of tokens by each weight; decode multiplies one token per sequence. A decode step
# reads every weight it needs and the KV cache once and does almost no arithmetic with them: its floor is bytes over
# bandwidth. This notebook computes that floor, shows why the first attention kernel for decode was latency-bound
# (too few programs, each reading too much), derives the fix — split the keys, merge the partial softmaxes exactly —
# checks the merge in float64 and the package's kernel against it, then turns to the dense projections — where a
# prediction from bytes alone fails and says what to change — reads the H200's measurement, and ends with the two
# schedules that attack what a launch costs: dependent launch and two streams.
#
# **What you will learn**
#
# - the bytes of a decode step (weights of the experts actually hit, the KV cache each layer sees) and its floor;
# - why one program per (sequence, head) leaves an H200 idle at batch 1, and how many programs split-K gives;
# - the log-sum-exp rule that merges partial softmaxes exactly, in any order of splits;
# - how packing the query heads of one KV head into one program reads each KV byte once;
# - why a projection at one row costs more than its bytes, and why fewer GEMMs beat a faster one;
# - how programmatic dependent launch starts each kernel while the one before finishes, and the one rule that keeps
#   it correct;
# - why the dense MLP and the experts of a layer run side by side on two streams, and what that hides.

# %% tags=["parameters"]
DEVICE = "cpu"  # "cuda" for compiled kernels
INTERACTIVE = True
DTYPE = "float32"

# %%
from gemma4lab.lab import notebook

ROOT = notebook.setup(DEVICE)  # on CPU: TRITON_INTERPRET=1, before any kernel is imported
RESULTS = ROOT / "results"

# %matplotlib inline
import torch
from IPython.display import display

import gemma4lab
from gemma4lab.kernels import DecodeConfig, gemma_decode_attention, gemma_decode_attention_ref, gemma_dense_gemm
from gemma4lab.kernels.decode_attention import decode_config
from gemma4lab.lab import viz
from gemma4lab.lab.floors import decode_floor, expected_experts
from gemma4lab.lab.profiling import profile_forward

dtype = getattr(torch, DTYPE)
torch.set_grad_enabled(False)
real = gemma4lab.Gemma4Config.preset("26b-a4b").text

# %% [markdown]
# ## The floor of one step
#
# One new token per sequence: every non-expert weight is read (the tied head reads the whole embedding table), the
# experts the batch's tokens picked (8 at batch 1; under random routing `E·(1 − (1 − k/E)^B)` for `B` sequences), and
# each layer's keys and values that the new token sees — all of them on the 5 full layers, the last 1023 on the 25
# sliding ones.

# %%
bw = 4.25e12  # H200 copy bandwidth; the recorded run below uses the one it measured
for batch in (1, 8):
    for context in (512, 16384):
        experts = expected_experts(real.num_experts, real.top_k_experts, batch)
        f = decode_floor(real, batch, context, experts, bw)
        print(f"batch {batch:>2}, context {context:>5}: {experts:5.1f} experts per layer, weights "
              f"{(f['non_expert_bytes'] + f['expert_bytes']) / 1e9:.2f} GB + KV {f['kv_bytes'] / 1e6:6.1f} MB "
              f"→ floor {f['floor_ms']:.2f} ms")

# %% [markdown]
# At batch 1 the KV cache is a few per cent of the bytes even at 16 384 tokens: the floor barely moves with
# context. **Prediction:** a decode step that reads its KV cache at a reasonable fraction of bandwidth should take
# nearly the same time at 16 384 tokens as at 512.
#
# ## Why the first attention kernel missed it
#
# The first decode kernel ran one program per (sequence, query head): 16 programs per layer at batch 1 on an H200's
# 132 SMs, each streaming its whole KV head alone, one tile after another. A lone program keeps only a few tiles in
# flight; its speed is latency-bound, ~10 GB/s, not the card's 4 TB/s. And the 8 query heads of a full layer's KV
# head each read that head again.

# %%
sms, slots_full = 132, 16385
bytes_per_program = slots_full * 2 * 512 * 2  # K and V of one KV head, bf16
print(f"full layer at 16384 context: 16 programs for {sms} SMs, {bytes_per_program / 1e6:.0f} MB each; the 8 query "
      f"heads of a KV head read it 8x: {8 * bytes_per_program * 2 / 1e6:.0f} MB per layer instead of "
      f"{2 * bytes_per_program / 1e6:.0f}")

# %% [markdown]
# ## Split the keys, merge exactly
#
# Split the visible keys into `S` slices and let a program own one slice. Each computes, for its keys only, the
# running max `m_s` of the scores, the sum `l_s = Σ exp(score − m_s)` and the unnormalised output
# `acc_s = Σ exp(score − m_s) · v`. The softmax over *all* keys follows from those three numbers per split:
#
# `M = max_s m_s`, `out = Σ_s exp(m_s − M) · acc_s / Σ_s exp(m_s − M) · l_s`
#
# — exact, because `exp(score − M) = exp(score − m_s) · exp(m_s − M)` for every key of split `s`. In float64:

# %%
g = torch.Generator().manual_seed(0)
d, n = 64, 300
q1 = torch.randn(d, generator=g, dtype=torch.float64)
keys = torch.randn(n, d, generator=g, dtype=torch.float64)
vals = torch.randn(n, d, generator=g, dtype=torch.float64)
full = torch.softmax(keys @ q1, 0) @ vals


def partial(ks, vs):
    s = ks @ q1
    m = s.max()
    p = torch.exp(s - m)
    return m, p.sum(), p @ vs


parts = [partial(keys[a:b], vals[a:b]) for a, b in ((0, 37), (37, 200), (200, 300))]
M = max(m for m, _, _ in parts)
merged = sum(torch.exp(m - M) * acc for m, _, acc in parts) / sum(torch.exp(m - M) * total for m, total, _ in parts)
print(f"three splits merged vs the whole softmax: largest difference {(merged - full).abs().max():.1e}")
assert torch.allclose(merged, full, rtol=1e-12, atol=1e-12)

# %% [markdown]
# ## The package's kernel: splits, packed heads, a combine
#
# `gemma_decode_attention` runs a grid of (sequence, KV head, split): each program loads the query rows of *all* the
# query heads that share its KV head (2 on sliding layers, 8 on full ones), streams its slice of K and V once, and
# writes `(m, l, acc)` per query head to an fp32 workspace; a second kernel merges the splits by the rule above, in a
# fixed order (deterministic, no atomics). Against the float64 reference, with 1, 3 and 7 splits forced, on a
# full-layer shape at CPU size (8 query heads on one KV head):

# %%
B, HQ, HKV, D, SLOTS = 2, 8, 1, 64, 96
q = torch.randn(B, HQ, D, generator=g).to(DEVICE, dtype)
k_cache = torch.randn(B, HKV, SLOTS, D, generator=g).to(DEVICE, dtype)
v_cache = torch.randn(B, HKV, SLOTS, D, generator=g).to(DEVICE, dtype)
positions = torch.tensor([60, 95], device=DEVICE)
truth = gemma_decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), positions)
for splits in (1, 3, 7):
    got = gemma_decode_attention(q, k_cache, v_cache, positions, config=DecodeConfig(block_n=16, splits=splits))
    err = ((got.double() - truth).norm() / truth.norm()).item()
    print(f"{splits} split(s): relative error against float64 {err:.1e}")
    assert err < (1e-6 if dtype == torch.float32 else 1e-2)

# %% [markdown]
# How many splits on the H200? Enough for two programs per SM over `batch × KV heads`, but no split shorter than a
# minimum (so the partials stay small beside the K/V bytes they summarise). At batch 1:

# %%
for name, d_head, hkv, group in (("sliding", 256, 8, 2), ("full", 512, 2, 8)):
    cfg = decode_config(d_head, group)
    for context in (512, 16384):
        n_slots = min(context + 9, 1024) if name == "sliding" else context + 9
        s = cfg.num_splits(n_slots, hkv, sms)
        print(f"{name:>7} layer, context {context:>5}: {s:>3} splits × {hkv} KV heads = {s * hkv:>3} programs")

# %% [markdown]
# ## The rest of the step: dense projections at one row
#
# Attention is a small part of a decode step's bytes; the weights are the rest. The dense ones — q, k, v, o, the dense
# MLP's gate, up and down on every layer, and the tied head — are 4.8 GB a step, 1.1 ms at copy bandwidth. Each is a
# matrix–vector product at batch 1, so its bytes should bound it. **Prediction from bytes alone**, for one sliding
# layer's projections on an H200:

# %%
hidden, inter = real.hidden_size, real.intermediate_size
proj = {"q": (16 * 256, hidden), "k": (8 * 256, hidden), "v": (8 * 256, hidden), "o": (hidden, 16 * 256),
        "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
by_bytes = {name: n * k * 2 / bw * 1e6 for name, (n, k) in proj.items()}  # bf16, µs
print("  ".join(f"{name} {us:.1f} µs" for name, us in by_bytes.items()),
      f"— a sliding layer's seven GEMMs: {sum(by_bytes.values()):.0f} µs")

# %% [markdown]
# The H200 sweep (`experiments/dense_small_m.py`) timed each projection alone at one row, inside a CUDA graph and on
# weights the 50 MB L2 cannot hold, under cuBLAS and under the package's few-row kernel, beside the run's copy
# bandwidth. The line through cuBLAS's points does not start at zero:

# %%
sweep = viz.load_recorded("dense_sweep", RESULTS / "runs")
if sweep:
    sdoc, slabel = sweep
    display(viz.plot_dense_sweep(sdoc, slabel))
    fit = viz.dense_fixed_cost(sdoc)
    one = {r["shape"]: r for r in sdoc["rows"] if r["rows"] == 1}
    k_meas = one["kv_sliding"]["cublas_ms"] * 1e3
    print(f"fit: {fit['fixed_us']:.1f} µs per GEMM + bytes at {fit['bandwidth_Bps'] / 1e12:.2f} TB/s; the k "
          f"projection: predicted {by_bytes['k']:.1f} µs from bytes, measured {k_meas:.1f} µs")
    notebook.check(fit["fixed_us"] > 2 * by_bytes["k"], "a fixed cost per GEMM larger than a small weight's stream")
else:
    print("No recorded results/runs/dense_sweep_*.json: run `python experiments/dense_small_m.py --json "
          "results/runs/dense_sweep_<card>.json` on a GPU.")

# %% [markdown]
# The prediction fails, and usefully: the stream runs at copy bandwidth (the slope), but every GEMM pays ~6 µs
# whatever its size — the kernel's ramp-up and tail and the graph's gap between nodes. Seven GEMMs a layer pay it
# seven times. The lever is therefore not a faster GEMM but fewer: q, k and v share their input, as do gate and up.
# `gemma_dense_gemm(x, [w_q, w_k, w_v])` runs up to three weights as one grid — each program owns 64 rows of one
# weight and streams them once — and writes one `[rows, N_q + N_k + N_v]` output whose column blocks are q, k and v.
# On the CPU, one launch against the float64 product:

# %%
x1 = torch.randn(1, 96, generator=g).to(DEVICE, dtype)
w3 = [torch.randn(n, 96, generator=g).to(DEVICE, dtype) / 10 for n in (64, 32, 32)]
y3 = gemma_dense_gemm(x1, w3)
exact3 = torch.cat([x1.double() @ w.double().T for w in w3], dim=1)
err3 = ((y3.double() - exact3).abs().max() / exact3.abs().max()).item()
launches = dict(profile_forward(lambda: gemma_dense_gemm(x1, w3), warmup=0)["top_kernels"])
print(f"q, k, v of one row in {launches.get('gemma4lab::dense_gemm', 0)} launch; largest error {err3:.1e}")
notebook.check(launches.get("gemma4lab::dense_gemm") == 1 and err3 < (1e-5 if dtype == torch.float32 else 1e-2),
               "one launch, the product to rounding")

# %% [markdown]
# `set_fusion("all")` switches this on for every dense projection at up to 16 rows (`Fusion.dense`: decode, short
# prompts; above, one cuBLAS GEMM per packed group — q/k/v, gate/up — over weights stored back to back,
# `gemma4lab.model.packing`). **Prediction for a decode step**, from the sweep's own times: a sliding
# layer's projections as four launches instead of seven, a full layer's (no v: K is V) as four instead of six, and
# the head:

# %%
if sweep:
    best = lambda name: one[name]["best"]["ms"] * 1e3  # noqa: E731
    lib = lambda name: one[name]["cublas_ms"] * 1e3  # noqa: E731
    sliding_us = (lib("q_sliding") + 2 * lib("kv_sliding") + lib("o_sliding") + 2 * lib("gate_or_up") + lib("down"),
               best("qkv_sliding") + best("o_sliding") + best("gate_up") + best("down"))
    full_us = (lib("q_full") + lib("k_full") + lib("o_full") + 2 * lib("gate_or_up") + lib("down"),
            best("qk_full") + best("o_full") + best("gate_up") + best("down"))
    head_us = (lib("lm_head"), best("lm_head"))
    before, after = (25 * s + 5 * f + h for s, f, h in zip(sliding_us, full_us, head_us))
    print(f"sliding layer {sliding_us[0]:.1f} → {sliding_us[1]:.1f} µs, full layer {full_us[0]:.1f} → {full_us[1]:.1f} µs, head "
          f"{head_us[0]:.0f} → {head_us[1]:.0f} µs: a step's dense GEMMs {before / 1e3:.2f} → {after / 1e3:.2f} ms")
    notebook.check(after < before, "fewer launches, less time")

# %% [markdown]
# That is ~0.65 ms of a ~4.8 ms step, the margin between the step and the 4.5 ms target. `bench-decode` checks it
# on the whole step: the recorded run below says which kernel it timed (its commit).
#
# ## Measured on an H200
#
# `bench-decode` times the whole step (one CUDA graph per batch size, `DecodeGraphRunner`) at batch 1–16 and
# contexts 512, 4096 and 16 384, beside the floor of the same run (solid: the step's device time; dashed: the
# generation loop with its host work):

# %%
rec = viz.load_recorded("decode", RESULTS)
if rec:
    doc, label = rec
    display(viz.plot_decode(doc, label))
    b1 = {r["context"]: r for r in doc["rows"].values() if r["batch"] == 1 and isinstance(r.get("graph"), dict)}
    for c, r in sorted(b1.items()):
        print(f"batch 1, context {c:>5}: {r['graph']['step_ms']:.2f} ms per token, {r['graph']['x_floor']:.2f}x its "
              f"floor of {r['floor_ms']:.2f} ms")
    if 512 in b1 and 16384 in b1:
        def graph_own_ms(r):
            """The graph's own time: the replay alone where the run timed it, else the profiled step's kernel time.
            The loop's step time also counts the GPU waiting while the host queues each replay (longer on a busy
            host), which is not what the prediction is about."""
            g, prof = r["graph"], r.get("graph_profile") or {}
            if "replay_ms" in g:
                return g["replay_ms"], "the replay alone"
            if "busy_ms" in prof:
                return prof["busy_ms"], "the kernels' busy time"
            return g["step_ms"], "the loop's step"
        (short_ms, what), (long_ms, _) = graph_own_ms(b1[512]), graph_own_ms(b1[16384])
        step_growth = b1[16384]["graph"]["step_ms"] - b1[512]["graph"]["step_ms"]
        print(f"512 → 16384 tokens: the loop's step grew {step_growth:.2f} ms, {what} {long_ms - short_ms:.2f} ms")
        notebook.check(long_ms - short_ms < 0.5,
                       f"the prediction: 16384 within 0.5 ms of 512 ({what} grew {long_ms - short_ms:.2f} ms)")
else:
    print("No recorded results/decode_*.json: run `python -m gemma4lab bench-decode` on a GPU.")

# %% [markdown]
# The graph no longer grows with context: the attention reads its KV bytes at bandwidth instead of latency. (The
# loop's step time can grow more than the graph does: it also counts the GPU waiting while the host queues each
# replay after the loop's sync, which a busy host lengthens — `bench-decode` times the replay alone as well.) What
# remains between the step and its floor is the rest of the step — ~500 small kernels whose gaps a graph does not
# remove, and the expert GEMM at one row per expert.
#
# ## Launching a kernel before the last one ends
#
# Inside a CUDA graph a kernel starts only when the one before has finished: its programs are scheduled, load their
# first tiles and only then stream — and the previous kernel's last programs run alone on a mostly idle GPU. A step
# of ~670 kernels pays that handover ~670 times. Hopper's *programmatic dependent launch* (PDL) lets kernel N+1 be
# launched while kernel N still runs: N+1's programs become resident, do whatever cannot depend on N, then block in
# `griddepcontrol.wait` until N has finished and its writes are visible. The rule that keeps it correct is one line:
# **nothing an earlier kernel writes (or reads) is touched before the wait** — not even a weight, which a cast just
# before may have written. The one thing the dense GEMM does earlier is ask L2 for its first weight tiles
# (`prefetch.global.L2`): a hint that fills the cache, never a register, so it cannot read a stale value. Every
# kernel of the package starts with:

# %%
import inspect

from gemma4lab.kernels import _common, dependent_launch_supported

print(inspect.getsource(_common.wait_and_release.fn))  # .fn: the Python function under @triton.jit

# %% [markdown]
# `with gemma4lab.kernels.dependent_launch():` launches the package's kernels with PDL (Triton's `launch_pdl`), and
# both graph runners capture with it wherever the card supports it (compute capability >= 9). **Prediction** for
# batch 1: a kernel timeline of the replayed step without PDL (`experiments/decode_step_timeline.py`, H200, 9099cde)
# showed a gap of ~0.45 µs between consecutive kernels; if PDL hides about that much per handover (the launch; part
# of each prologue on top, part of each gap left), a step of the recorded run's kernels saves about:

# %%
kernels_per_step = 670
if rec:
    prof = next((r.get("graph_profile") for r in doc["rows"].values() if r.get("graph_profile")), None)
    kernels_per_step = prof["kernels"] if prof else kernels_per_step
predicted_ms = kernels_per_step * 0.45e-3
print(f"{kernels_per_step} kernels × 0.45 µs ≈ {predicted_ms:.2f} ms a step")

# %% [markdown]
# The H200 A/B (`bench-decode --launch-ab`: each point's graph captured again with PDL flipped, in the same process,
# its greedy tokens checked against eager):

# %%
def check_ab(doc, key, setting, predicted_ms, tokens_check):
    """A recorded A/B (``bench-decode --launch-ab`` / ``--branches-ab``): each point's graph and its twin
    ``row[key]``, captured again in the same process with ``setting`` flipped. Prints each replay without → with the
    setting, checks the batch-1 saving against ``predicted_ms`` (within 2×) and the twin's greedy tokens."""
    for r in sorted(doc["rows"].values(), key=lambda r: (r["batch"], r["context"])):
        twin = r.get(key) or r.get("graph_pdl")  # the PDL run (bc31625) named its twin graph_pdl
        on, off = (twin, r["graph"]) if twin.get(setting, True) else (r["graph"], twin)
        saved = off["replay_ms"] - on["replay_ms"]
        print(f"batch {r['batch']} × {r['context']:>5}: replay {off['replay_ms']:.2f} → {on['replay_ms']:.2f} ms "
              f"(−{saved:.2f} ms, {on['replay_ms'] / off['replay_ms']:.3f}×)")
        if r["batch"] == 1:
            notebook.check(0.5 * predicted_ms < saved < 2 * predicted_ms,
                           f"the prediction within 2× (predicted {predicted_ms:.2f} ms, measured {saved:.2f} ms)")
        notebook.check(twin["tokens_equal"], tokens_check)


ab = viz.load_recorded("decode_launch_ab", RESULTS / "runs")
if ab:
    abdoc, ablabel = ab
    print(ablabel)
    check_ab(abdoc, "graph_ab", "dependent_launch", predicted_ms, "the same greedy tokens with and without PDL")
else:
    print("No recorded results/runs/decode_launch_ab_*.json: run `python -m gemma4lab bench-decode --launch-ab` "
          "on a GPU.")

# %% [markdown]
# Live: on a Hopper GPU the tiny model's decode graph, captured with and without PDL, gives the same logits bit for
# bit (a kernel that read its input before the wait would race the kernel before it, and differ).

# %%
if dependent_launch_supported(torch.device(DEVICE)):
    from gemma4lab.runtime.decode_graphs import DecodeGraphRunner

    tiny = gemma4lab.random_init("tiny", dtype=torch.bfloat16, device=DEVICE, seed=5).set_fusion("all")
    prompt = torch.randint(3, 400, (1, 21), generator=g).to(DEVICE)
    outs = []
    for pdl in (False, True):
        runner = DecodeGraphRunner(tiny, max_batch=1, max_len=64, progress=False, dependent_launch=pdl)
        tokens = runner.generate(prompt, max_new_tokens=6)
        outs.append(runner.step(tokens[:, -1], torch.tensor([tokens.shape[1] - 1], device=DEVICE)))
    notebook.check(torch.equal(outs[0], outs[1]), "the decode graph with PDL gives the same logits bit for bit")
else:
    print(f"{DEVICE}: no programmatic dependent launch here (it needs compiled Triton on compute capability >= 9); "
          "the recorded A/B above is the measurement.")

# %% [markdown]
# ## Two streams: the dense MLP beside the experts
#
# PDL shortens each handover, but a decode step still pays every launch's ramp and tail in turn. How much is that?
# The expert GEMMs answer it: timed alone in a CUDA graph on weights that L2 cannot hold
# (`experiments/moe_decode_stream.py`), each takes longer than its bytes over the copy bandwidth, by about the same
# few microseconds whatever the tiling — four levers built to shrink it (a CUDA-core GEMV, an L2 prefetch before
# the PDL wait, both GEMMs in one launch, split-K) were measured and refuted, and a kernel that only *reads* the
# same bytes in one launch pays much the same (74 % of copy bandwidth at one token; `docs/perf_notes.md`). A cost
# per launch — ramp and tail — that one stream cannot hide:

# %%

from gemma4lab.lab import measure

stream = None
for path in sorted((RESULTS / "runs").glob("moe_decode_stream_*.json")):
    d = measure.read_json(path)
    if d and "gate_up_alone" in d["rows"][0]["paths"]:
        stream = d
        break
excess_us = None
if stream:
    one = next(r for r in stream["rows"] if r["tokens"] == 1)
    bw = stream["copy_bandwidth_Bps"]
    excess = {}
    for gemm in ("gate_up", "down"):
        ms, nbytes = one["paths"][f"{gemm}_alone"]["ms"], one[f"{gemm}_bytes"]
        excess[gemm] = ms * 1e3 - nbytes / bw * 1e6
        print(f"one token, {gemm:>7}: {ms * 1e3:5.1f} µs alone, its {nbytes / 1e6:.1f} MB move in "
              f"{nbytes / bw * 1e6:4.1f} µs → {excess[gemm]:.1f} µs above the stream")
    excess_us = sum(excess.values()) / len(excess)
    print(f"{viz.env_label(stream)}\nmean cost per launch above the stream: {excess_us:.1f} µs")
else:
    print("No recorded results/runs/moe_decode_stream_*.json: run `python experiments/moe_decode_stream.py` on a GPU.")

# %% [markdown]
# Which launches must wait for which? In a MoE layer the dense MLP and the MoE block both read the post-attention
# stream, and only the epilogue needs both results (`gemma4_architecture.md`: `d = mlp(…)`, `m = experts(…)`,
# then `rms(rms(d) + rms(m))`). So `Fusion.branches` forks the dense MLP onto a second CUDA stream and joins before
# the epilogue: eagerly two streams, in a captured graph two branches. The kernels are the same, so the bits are
# too. The dense branch's launches at one row (counted on this device, one fused-kernel call counting once, views
# left out):

# %%
layer0 = gemma4lab.random_init("tiny", dtype=dtype, device=DEVICE, seed=0).language_model.layers[0]
x1 = torch.randn(1, layer0.mlp.gate_proj.in_features, dtype=dtype, device=DEVICE)
summary = profile_forward(lambda: layer0.mlp(x1, fused_act=True, dense=True), warmup=0)
# on CPU the profile also lists ATen views (aten::split_with_sizes), which launch nothing on a GPU: left out
dense_launches = sum(n for name, n in summary["top_kernels"] if not name.startswith("aten::"))
print(f"dense MLP at one row: {dense_launches} launches (gate|up in one GEMM, the GELU product, down)")

# %% [markdown]
# **Prediction:** side by side, the dense branch's launch costs hide under the expert branch's stream (its bytes do
# not: they still share the memory system), so a batch-1 step saves about layers × dense launches × the cost per
# launch above.

# %%
ab_branches = viz.load_recorded("decode_branches_ab", RESULTS / "runs")
if ab_branches and excess_us is not None:
    bdoc, blabel = ab_branches
    predicted_branch_ms = real.num_hidden_layers * dense_launches * excess_us * 1e-3
    print(f"predicted: {real.num_hidden_layers} × {dense_launches} × {excess_us:.1f} µs ≈ {predicted_branch_ms:.2f} ms"
          f"\n{blabel}")
    check_ab(bdoc, "graph_branches_ab", "branches", predicted_branch_ms,
             "the same greedy tokens with one stream and with two")
else:
    print("No recorded results/runs/decode_branches_ab_*.json (or no expert-stream file): run "
          "`python -m gemma4lab bench-decode --branches-ab` on a GPU.")

# %% [markdown]
# The prediction counts every dense launch's cost as hidden; the measurement saves less, because the two branches
# also compete for the same bandwidth and the MoE branch's own launches are still in a row. Live on a GPU, the tiny
# model's decode graph with two branches gives the one-stream graph's logits bit for bit:

# %%
if torch.device(DEVICE).type == "cuda":
    from dataclasses import replace

    from gemma4lab.runtime.decode_graphs import DecodeGraphRunner

    prompt2 = torch.randint(3, 400, (1, 21), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    outs2 = []
    for branches in (False, True):
        tiny2 = gemma4lab.random_init("tiny", dtype=torch.bfloat16, device=DEVICE, seed=5)
        tiny2.set_fusion(replace(gemma4lab.Fusion.all(), branches=branches))
        runner = DecodeGraphRunner(tiny2, max_batch=1, max_len=64, progress=False)
        tokens = runner.generate(prompt2, max_new_tokens=6)
        outs2.append(runner.step(tokens[:, -1], torch.tensor([tokens.shape[1] - 1], device=DEVICE)))
    notebook.check(torch.equal(outs2[0], outs2[1]), "two branches give the one-stream graph's logits bit for bit")
else:
    print(f"{DEVICE}: one stream only (a second stream needs CUDA); the recorded A/B above is the measurement.")

# %% [markdown]
# ## Exercises
#
# Each exercise has a cell for your answer, a collapsed solution cell that fills in only what you left as `None`,
# and a check.
#
# **1. Merge two partials.** Write `merge(a, b)` for two partial results `(m, l, acc)` of disjoint key sets; it
# returns the partial of their union (so it can be applied split after split). The check merges the three splits
# above pairwise and compares with the whole softmax.

# %%
merge = None  # your answer: a function ((m, l, acc), (m, l, acc)) -> (m, l, acc)

# %% jupyter={"source_hidden": true} tags=["solution"]
if merge is None:
    def merge(a, b):
        (ma, la, acca), (mb, lb, accb) = a, b
        m = torch.maximum(ma, mb)
        wa, wb = torch.exp(ma - m), torch.exp(mb - m)
        return m, wa * la + wb * lb, wa * acca + wb * accb

# %%
m_, l_, acc_ = merge(merge(parts[0], parts[1]), parts[2])
notebook.check(torch.allclose(acc_ / l_, full, rtol=1e-12, atol=1e-12), "pairwise merging gives the whole softmax")

# %% [markdown]
# **2. The floor at batch 8.** Distinct prompts route independently: how many distinct experts does a step of 8
# sequences touch per layer under uniform random routing (128 experts, top-8)? Set `experts_8`; the check compares
# with the formula's value that the floors above use.

# %%
experts_8 = None  # your answer: a float

# %% jupyter={"source_hidden": true} tags=["solution"]
if experts_8 is None:
    experts_8 = 128 * (1 - (1 - 8 / 128) ** 8)  # an expert is missed by all 8 tokens with probability (1 - k/E)^8

# %%
print(f"batch 8: {experts_8:.1f} of 128 experts per layer, {experts_8 / 8:.1f}x batch 1's")
notebook.check(abs(experts_8 - expected_experts(128, 8, 8)) < 0.05, "E·(1 − (1 − k/E)^B)")
