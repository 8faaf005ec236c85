"""``gemma_decode_attention``: one new token per sequence against the static KV cache (full layers and rings), by the
single-head kernel and by split-K with the query heads of a KV head packed, against float64 and each other."""

from __future__ import annotations

import math

import pytest
import torch
from support import BF16, FP32, UNIT, assert_rounded

import gemma4lab.kernels.decode_attention as DA
from gemma4lab.attention import BACKENDS, Visibility
from gemma4lab.kernels import INTERPRET, DecodeConfig, decode_config, gemma_decode_attention, gemma_decode_attention_ref

pytestmark = pytest.mark.usefixtures("triton_path_only", "poisoned_workspace")

#: The single-head baseline, packed heads in one split, and packed heads split 3 and 5 ways (16-slot minimum).
CONFIGS = {"single-head": DecodeConfig(16, pack_heads=False), "packed-1": DecodeConfig(16, splits=1),
           "split-3": DecodeConfig(16, splits=3, min_split_slots=16),
           "split-5": DecodeConfig(16, splits=5, min_split_slots=32)}


_WORKSPACE = DA._workspace


@pytest.fixture
def poisoned_workspace(monkeypatch):
    """The split partials start as NaN: a combine that reads a row no split wrote fails."""
    calls = []

    def nan_workspace(*args):
        calls.append(args)
        return tuple(t.fill_(float("nan")) for t in workspace(*args))

    workspace = _WORKSPACE
    monkeypatch.setattr(DA, "_workspace", nan_workspace)
    return calls


def _cache(b, hkv, slots, d, dtype=FP32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b + 1, hkv, slots, d, generator=g).to(dtype).to(device) for _ in range(2))


def _q(b, hq, d, dtype=FP32, device="cpu", seed=0):
    """Queries scaled by d^-1/2: scores of O(1), so the softmax spreads over many keys and every split counts."""
    g = torch.Generator().manual_seed(seed + 7)
    return (torch.randn(b, hq, d, generator=g) / math.sqrt(d)).to(dtype).to(device)


def _ring(pos, w):
    """slot -> position of a ring of ``w`` slots after writing positions 0..pos (-1 where never written)."""
    sp = torch.full((w,), -1)
    for p in range(pos + 1):
        sp[p % w] = p
    return sp


def fp32_tol(q, kc, vc, pos, sp=None, w=None) -> float:
    """Absolute error allowed for an fp32 softmax-weighted sum over the cache. Rounding errors of random sign grow
    like sqrt(terms)·u (u = 2^-24): each score is a D-term dot of O(1) (queries scaled by D^-1/2) whose error moves
    its weight by as much relatively; numerator and denominator are sums over the ``slots`` keys; the log2(e)
    scaling, exp2, the online rescales and a combine add a few roundings. All of it relative to the softmax-weighted
    mean of |v| (the float64 reference fed |v|), the scale of the sum's terms; 8× margin."""
    scale = gemma_decode_attention_ref(q.double(), kc.double(), vc.double().abs(), pos, slot_pos=sp, window=w)
    return 8 * UNIT[FP32] * (math.sqrt(kc.shape[2]) + math.sqrt(q.shape[-1]) + 4) * float(scale.nan_to_num().max())


def _attend(q, kc, vc, pos, sp, w, config):
    """The kernel into a NaN-poisoned output (``config`` None: the registered op's heuristic)."""
    out = torch.full_like(q, float("nan"))
    return gemma_decode_attention(q, kc, vc, pos, slot_pos=sp, window=w, config=config, out=out)


def _check_all_configs(q, kc, vc, pos, sp=None, w=None):
    """Every config within fp32 rounding of float64 and of each other; the reference = the rule's decode form."""
    ref = gemma_decode_attention_ref(q.double(), kc.double(), vc.double(), pos, slot_pos=sp, window=w)
    rule = BACKENDS["sdpa"].decode(q.double(), kc.double(), vc.double(), pos, sp, Visibility(window=w))
    torch.testing.assert_close(ref, rule, rtol=1e-12, atol=1e-12)
    tol = fp32_tol(q, kc, vc, pos, sp, w)
    got = {name: _attend(q, kc, vc, pos, sp, w, cfg) for name, cfg in CONFIGS.items()}
    got["heuristic"] = _attend(q, kc, vc, pos, sp, w, None)
    for name, o in got.items():
        torch.testing.assert_close(o.double(), ref, rtol=UNIT[FP32], atol=tol, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(o, got["packed-1"], rtol=2 * UNIT[FP32], atol=2 * tol,
                                   msg=lambda m, n=name: f"{n} vs one split: {m}")
    return got


# ---- full layers -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [32, 24])
def test_full_layer_against_float64_and_the_rule(d, poisoned_workspace):
    kc, vc = _cache(3, 2, 40, d, seed=d)
    _check_all_configs(_q(3, 4, d), kc, vc, torch.tensor([0, 17, 39]))
    assert poisoned_workspace  # the split configs went through the workspace


# split-5 (32-slot minimum): slices of 32 up to position 159, then cdiv(pos + 1, 5) rounded up to 16; split-3
# (16-slot minimum): 16 up to 47, 32 up to 95, 48 up to 143 ... Positions around those edges, 0 and 1, and a context
# shorter than one split, mixed in each batch.
@pytest.mark.parametrize("positions", [(0, 31, 160), (1, 32, 47), (15, 33, 48), (16, 63, 95), (17, 64, 96),
                                       (159, 127, 143), (161, 128, 144)], ids=str)
def test_full_layer_at_split_boundaries(positions):
    kc, vc = _cache(3, 2, 176, 32, seed=sum(positions))
    _check_all_configs(_q(3, 8, 32, seed=positions[0]), kc, vc, torch.tensor(positions))


@pytest.mark.parametrize("sliding", [True, False], ids=["sliding-256", "full-512"])
def test_real_head_dims(sliding):
    """Gemma 4's heads: 16 query heads over 8 KV heads of 256 (a wrapped ring) or over 2 KV heads of 512."""
    hkv, d, slots = (8, 256, 48) if sliding else (2, 512, 80)
    kc, vc = _cache(2, hkv, slots, d, seed=d)
    q = _q(2, 16, d)
    if sliding:
        pos = torch.tensor([20, 100])
        _check_all_configs(q, kc, vc, pos, torch.stack([_ring(20, slots), _ring(100, slots), _ring(0, slots)]), slots)
    else:
        _check_all_configs(q, kc, vc, torch.tensor([1, 79]))


# ---- sliding rings -------------------------------------------------------------------------------------------------
def test_sliding_ring_against_float64_and_the_rule():
    w = 16
    kc, vc = _cache(2, 2, w, 32, seed=1)
    slot_pos = torch.stack([_ring(5, w), _ring(40, w), _ring(0, w)])
    _check_all_configs(_q(2, 4, 32), kc, vc, torch.tensor([5, 40]), slot_pos, w)


@pytest.mark.parametrize("positions", [(0, 1, 15), (16, 17, 63), (64, 65, 200), (47, 48, 49)], ids=str)
@pytest.mark.parametrize("window", [64, 40, 100], ids=lambda w: f"window{w}")
def test_sliding_ring_young_wrapped_and_narrower(positions, window):
    """A 64-slot ring: young (empty slots, splits that see nothing), wrapped, around the split-3 slices (32 slots:
    cdiv(64, 3) rounded up to 16) and split-5's (16); a window narrower than the ring and one wider (a cache shorter
    than the window, as ``KVCache`` makes with a small ``max_len``)."""
    ring = 64
    kc, vc = _cache(3, 2, ring, 32, seed=window)
    slot_pos = torch.stack([_ring(p, ring) for p in positions] + [_ring(3, ring)])
    _check_all_configs(_q(3, 4, 32, seed=window), kc, vc, torch.tensor(positions), slot_pos, window)


def test_ring_with_holes_and_a_split_of_empty_slots():
    """Slots emptied by hand (-1) anywhere, one split's whole slice among them."""
    ring = 64
    kc, vc = _cache(2, 2, ring, 32, seed=5)
    slot_pos = torch.stack([_ring(90, ring), _ring(90, ring), _ring(90, ring)])
    slot_pos[0, 16:32] = -1  # split-5's second slice, half of split-3's first
    slot_pos[1, ::3] = -1
    _check_all_configs(_q(2, 4, 32), kc, vc, torch.tensor([90, 90]), slot_pos, 64)


def test_a_wrong_slot_is_caught():
    """The tolerance can fail: one visible key more (the boundary ``slot_pos > pos - window`` taken as ``>=``)."""
    ring = 64
    kc, vc = _cache(1, 2, ring, 32, seed=2)
    q, pos = _q(1, 4, 32), torch.tensor([100])
    slot_pos = _ring(100, ring)[None]
    got = _attend(q, kc, vc, pos, slot_pos, 40, CONFIGS["split-3"])
    off_by_one = gemma_decode_attention_ref(q.double(), kc.double(), vc.double(), pos, slot_pos=slot_pos, window=41)
    tol = fp32_tol(q, kc, vc, pos, slot_pos, 40)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got.double(), off_by_one, rtol=UNIT[FP32], atol=tol)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_splits_without_visible_keys_give_nan_like_the_reference():
    """Every slot empty: no split sees a key (m = -inf, l = 0 everywhere); the combine does not invent a value."""
    kc, vc = _cache(1, 2, 32, 32)
    slot_pos = torch.full((2, 32), -1)
    ref = gemma_decode_attention_ref(_q(1, 4, 32), kc, vc, torch.tensor([5]), slot_pos=slot_pos, window=32)
    got = _attend(_q(1, 4, 32), kc, vc, torch.tensor([5]), slot_pos, 32, CONFIGS["split-3"])
    assert ref.isnan().all() and got.isnan().all()


# ---- launch settings and bad input ---------------------------------------------------------------------------------
def test_split_heuristic_on_an_h200():
    """The prediction in the kernel's docstring: 132 SMs, bf16, 26B-A4B's layers, the bench's cache sizes."""
    sliding, full = decode_config(256, 2, BF16), decode_config(512, 8, BF16)
    assert (sliding.block_n, sliding.min_split_slots, full.block_n, full.min_split_slots) == \
        (16 if INTERPRET else 32, 32, 16, 128)
    assert sliding.num_stages == full.num_stages == 3 and decode_config(512, 8, FP32).num_stages == 1
    assert sliding.num_splits(1024, 1 * 8, 132) == 32 and sliding.num_splits(521, 8, 132) == 17
    assert [full.num_splits(c + 9, 1 * 2, 132) for c in (512, 4096, 16384)] == [5, 33, 129]
    assert sliding.num_splits(1024, 16 * 8, 132) == 3 and full.num_splits(16393, 16 * 2, 132) == 9
    assert full.num_splits(10**6, 2, 132) == 132  # never more than programs_per_sm × SMs programs
    assert DecodeConfig(16, pack_heads=False).num_splits(10**6, 1, 132) == 1
    assert DecodeConfig(16, splits=7).num_splits(16, 64, 132) == 7


@pytest.mark.parametrize("kw, match", [(dict(splits=0), "splits"), (dict(splits=2, pack_heads=False), "one split"),
                                       (dict(block_n=8), ">= 16"), (dict(min_split_slots=0), "min_split_slots"),
                                       (dict(num_stages=0), "num_stages"), (dict(block_n=24), "power of two")])
def test_bad_launch_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        DecodeConfig(**{"block_n": 16, **kw})


def test_bad_input():
    kc, vc = _cache(1, 2, 8, 32)
    q = torch.randn(1, 4, 32)
    one = torch.tensor([1])
    with pytest.raises(ValueError, match="positions"):
        gemma_decode_attention(q, kc, vc, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="positions"):
        gemma_decode_attention(q, kc, vc, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="window and slot_pos"):
        gemma_decode_attention(q, kc, vc, one, window=4)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        gemma_decode_attention(q, kc, vc, one, slot_pos=torch.zeros(2, 8, dtype=torch.long), window=0)
    with pytest.raises(ValueError, match="slot_pos must be an int tensor"):
        gemma_decode_attention(q, kc, vc, one, slot_pos=torch.zeros(2, 8), window=4)
    with pytest.raises(ValueError, match="slot_pos must be an int tensor"):
        gemma_decode_attention(q, kc, vc, one, slot_pos=torch.zeros(2, 7, dtype=torch.long), window=4)
    with pytest.raises(TypeError, match="share a float dtype"):
        gemma_decode_attention(q.double(), kc, vc, one)
    with pytest.raises(ValueError, match="does not fit"):
        gemma_decode_attention(torch.randn(1, 3, 32), kc, vc, one)
    with pytest.raises(ValueError, match="no slots"):
        gemma_decode_attention(q, kc[:, :, :0], vc[:, :, :0], one)
    with pytest.raises(TypeError, match="DecodeConfig"):
        gemma_decode_attention(q, kc, vc, one, config={"block_n": 16})
    with pytest.raises(ValueError, match="out must be"):
        gemma_decode_attention(q, kc, vc, one, out=torch.empty(1, 4, 16))


# ---- end to end ------------------------------------------------------------------------------------------------------
def test_decode_graph_runner_with_split_kernels_generates_the_eager_tokens(hf_tiny, monkeypatch, poisoned_workspace):
    """Greedy generation through the decode runner (its eager path on CPU) with our kernels, decode attention split
    3 ways, against the eager model with the SDPA reference: the same 18 tokens per prompt (past the 16-token
    window: the ring wraps)."""
    import gemma4lab
    from gemma4lab.runtime.decode_graphs import DecodeGraphRunner

    model = gemma4lab.load_pretrained(hf_tiny[1])
    g = torch.Generator().manual_seed(11)
    prompts = torch.randint(3, 400, (2, 12), generator=g)
    expected = model.generate(prompts, 18, eos_token_id=[], pad_token_id=0)
    monkeypatch.setattr(DA, "decode_config", lambda *a: DecodeConfig(16, splits=3, min_split_slots=16))
    try:
        model.set_attention_backend("triton")
        runner = DecodeGraphRunner(model, max_batch=2, max_len=64, progress=False)
        got = runner.generate(prompts, 18, eos_token_id=[], pad_token_id=0)
    finally:
        model.set_attention_backend("auto")
    assert poisoned_workspace  # the split path ran
    assert torch.equal(got, expected)


# ---- GPU (compiled Triton, bf16 and fp32) ---------------------------------------------------------------------------
def _gpu_case(sliding: bool, dtype, batch: int = 3):
    hkv, d, slots = (8, 256, 1024) if sliding else (2, 512, 16393)
    kc, vc = _cache(batch, hkv, slots, d, dtype=dtype, device="cuda", seed=slots)
    q = _q(batch, 16, d, dtype=dtype, device="cuda")
    pos = torch.tensor([0, 1500, 4000] if sliding else [0, 1024, 16384], device="cuda")[:batch]
    sp = torch.stack([_ring(int(p), slots) for p in pos] + [_ring(0, slots)]).cuda() if sliding else None
    return q, kc, vc, pos, sp, slots if sliding else None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, FP32])
@pytest.mark.parametrize("sliding", [True, False])
@pytest.mark.parametrize("config", [None, CONFIGS["single-head"], DecodeConfig(16, splits=1)],
                         ids=["heuristic", "single-head", "packed-1"])
def test_gpu_real_shapes_against_float64(dtype, sliding, config):
    """Head 256 on a 1024-slot ring, head 512 over 16385 cached positions; batch 3 at different positions."""
    q, kc, vc, pos, sp, w = _gpu_case(sliding, dtype)
    got = _attend(q, kc, vc, pos, sp, w, config)
    ref = gemma_decode_attention_ref(q.double(), kc.double(), vc.double(), pos, slot_pos=sp, window=w)
    if dtype == FP32:  # GPU exp2 is an approximation of a few ulp: 2x the CPU bound
        torch.testing.assert_close(got.double(), ref, rtol=UNIT[FP32], atol=2 * fp32_tol(q, kc, vc, pos, sp, w))
    else:  # P rounded to bf16 for the PV dot: within 2^-9 of the largest value, plus the output's rounding
        assert_rounded(got, ref, dtype, math_err=2**-8)


@pytest.mark.gpu
@pytest.mark.parametrize("sliding", [True, False])
def test_gpu_graph_replay_follows_the_positions(sliding):
    """One captured launch, replayed after the positions (and the ring) moved: the split slices follow the device
    positions, no recapture."""
    q, kc, vc, pos, sp, w = _gpu_case(sliding, BF16, batch=2)
    out = torch.empty_like(q)
    gemma_decode_attention(q, kc, vc, pos, slot_pos=sp, window=w, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gemma_decode_attention(q, kc, vc, pos, slot_pos=sp, window=w, out=out)
    for new in ([5, 700], [1023, 3000]) if sliding else ([5, 700], [16384, 9000]):
        pos.copy_(torch.tensor(new))
        if sliding:
            sp[:2].copy_(torch.stack([_ring(p, kc.shape[2]) for p in new]))
        out.fill_(float("nan"))
        graph.replay()
        ref = gemma_decode_attention_ref(q.double(), kc.double(), vc.double(), pos, slot_pos=sp, window=w)
        assert_rounded(out, ref, BF16, math_err=2**-8)


@pytest.mark.gpu
@pytest.mark.parametrize("sliding", [True, False])
def test_gpu_ab_timing(sliding, monkeypatch):
    """A/B for the lead (``pytest -s``): batch 1 at 16384 (a full ring on sliding layers), the split kernel against
    the single-head baseline, GPU time of a CUDA-graph replay in µs and GB/s of the K/V that must be read; the
    outputs agree within bf16 rounding."""
    import triton.testing

    monkeypatch.setattr(DA, "_workspace", _WORKSPACE)  # no NaN fill in the timed graph
    q, kc, vc, pos, sp, w = _gpu_case(sliding, BF16, batch=1)
    if sliding:
        pos.fill_(16384)
        sp[:1].copy_(_ring(16384, kc.shape[2])[None])
    seen = min(int(pos[0]) + 1, kc.shape[2])
    kv_bytes = 2 * seen * kc.shape[1] * kc.shape[3] * kc.element_size()
    splits = decode_config(q.shape[-1], q.shape[1] // kc.shape[1], BF16).num_splits(
        kc.shape[2], kc.shape[1], torch.cuda.get_device_properties(0).multi_processor_count)
    outs, line = {}, []
    for name, cfg in (("single-head", CONFIGS["single-head"]), (f"split-{splits}", None)):
        out = outs[name] = torch.empty_like(q)
        fn = lambda c=cfg, o=out: gemma_decode_attention(q, kc, vc, pos, slot_pos=sp, window=w, config=c, out=o)
        fn()
        us = triton.testing.do_bench_cudagraph(fn, rep=100) * 1e3
        line.append(f"{name} {us:.1f} us = {kv_bytes / us / 1e3:.0f} GB/s")
    print(f"\n{'sliding' if sliding else 'full'} layer, batch 1, {seen} slots, {kv_bytes / 1e6:.1f} MB: "
          + "; ".join(line))
    assert_rounded(outs[f"split-{splits}"], outs["single-head"].double(), BF16, roundings=2, math_err=2**-8)
