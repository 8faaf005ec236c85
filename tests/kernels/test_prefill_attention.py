"""``gemma_prefill_attention``: FlashAttention-style prefill over packed prompts (under the interpreter on CPU,
compiled on a GPU) against float64, at scaled-down and at the real shapes."""

from __future__ import annotations

import pytest
import torch
from support import BF16, FP32, assert_rounded

from gemma4lab.attention import PackedBatch, Visibility, sdpa_attention
from gemma4lab.kernels import AttentionConfig, gemma_prefill_attention, gemma_prefill_attention_ref

pytestmark = pytest.mark.usefixtures("triton_path_only")


def _qkv(n, hq, hkv, d, dtype=FP32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    # q/k have unit-RMS rows after Gemma's q/k norms, so scores are O(√d) with scale 1.0: keep that regime.
    return tuple(torch.randn(n, h, d, generator=g, device=device, dtype=torch.float32).to(dtype)
                 for h in (hq, hkv, hkv))


def _cu(lengths, device="cpu"):
    return torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)


def _oracle(q, k, v, cu, **kw):
    return gemma_prefill_attention_ref(q.double(), k.double(), v.double(), cu, **kw)


def _run(q, k, v, lengths, config=None, **kw):
    cu = _cu(lengths, q.device)
    out = torch.full_like(q, float("nan"))  # poisoned: every real element must be written
    got = gemma_prefill_attention(q, k, v, cu, max(lengths), out=out, config=config, **kw)
    assert got is out
    return got, _oracle(q, k, v, cu, **kw)


def _assert(got, ref):
    """fp32: IEEE dots, parity-grade: a sum over up to T keys of fp32 products and hardware exp2 (~2 ulp) gives
    ~√T·2⁻²² of the largest output (3e-5 at 1500 keys, measured 1.3e-5 on an H200). bf16: P is rounded to bf16
    before PV, so each output is an average of V with weights off by one bf16 rounding: two roundings."""
    if got.dtype == FP32:
        assert_rounded(got, ref, FP32, math_err=3e-5)
    else:
        assert_rounded(got, ref, got.dtype, roundings=2, math_err=2**-8)


@pytest.mark.parametrize("lengths", [[1], [15], [16], [17], [65], [5, 40, 1, 23]])
def test_full_layer_causal_gqa(lengths):
    _assert(*_run(*_qkv(sum(lengths), 4, 1, 64, seed=len(lengths)), lengths))


@pytest.mark.parametrize("lengths", [[1], [15], [16], [17], [65], [3, 33, 18]])
def test_sliding_layer_window_edges(lengths):
    """Window 16 with lengths 15/16/17/65: the 1023/1024/1025/4097 cases of the real window, scaled down."""
    _assert(*_run(*_qkv(sum(lengths), 4, 2, 32, seed=sum(lengths)), lengths, window=16))


def test_odd_head_dim_and_strided_views():
    """Head dim 24 (masked lanes) and q/k/v as column views of one fused projection (row stride > heads·dim)."""
    n, hq, hkv, d = 29, 2, 1, 24
    fused = torch.randn(n, (hq + 2 * hkv) * d + 8)
    q = fused[:, : hq * d].view(n, hq, d)
    k = fused[:, hq * d: (hq + hkv) * d].view(n, hkv, d)
    v = fused[:, (hq + hkv) * d: (hq + 2 * hkv) * d].view(n, hkv, d)
    _assert(*_run(q, k, v, [11, 18], window=8))
    cfg = AttentionConfig(16, 16, 4, 1, dv_splits=2)  # the second program's lanes 24..31 are masked
    _assert(gemma_prefill_attention(q, k, v, _cu([11, 18]), 18, config=cfg), _oracle(q, k, v, _cu([11, 18])))


@pytest.mark.parametrize("start", [0, 9, 14, 30])
def test_image_blocks_on_sliding_layers(start):
    """An image of 9 soft tokens, bidirectional inside, placed around the window edge (window 16)."""
    lengths = [12, 48]
    n = sum(lengths)
    blocks = torch.full((n,), -1)
    blocks[12 + start: 12 + start + 9] = 0
    blocks[2:5] = 1  # a second image in the first prompt
    q, k, v = _qkv(n, 4, 2, 32, seed=start)
    rule = Visibility(window=16, image_blocks=True)
    got, ref = _run(q, k, v, lengths, window=16, key_end=rule.key_end(blocks))
    _assert(got, ref)
    model_ref = sdpa_attention(q.double(), k.double(), v.double(), PackedBatch.from_lengths(lengths, block_ids=blocks),
                               True, 16)
    torch.testing.assert_close(ref, model_ref, rtol=1e-12, atol=1e-12)  # the kernel's form = the rule's dense form


def _chunk_run(q, k, v, chunks, window, key_end=None, config=None):
    """Each ``(start, end, key_start)`` chunk of one prompt packed as a prompt of its own: queries ``[start, end)``,
    keys ``[key_start, end)`` (``cu_seqlens_k``) → the kernel and the float64 oracle."""
    qs = torch.cat([q[s:e] for s, e, _ in chunks])
    ks, vs = (torch.cat([t[lo:e] for s, e, lo in chunks]) for t in (k, v))
    cu, cu_k = (_cu(n, q.device) for n in ([e - s for s, e, _ in chunks], [e - lo for s, e, lo in chunks]))
    kw = dict(window=window, key_end=key_end, cu_seqlens_k=cu_k)
    out = torch.full_like(qs, float("nan"))
    got = gemma_prefill_attention(qs, ks, vs, cu, max(e - s for s, e, _ in chunks), out=out, config=config, **kw)
    return got, _oracle(qs, ks, vs, cu, **kw)


@pytest.mark.parametrize("sliding", [True, False])
def test_chunks_after_cached_keys(sliding):
    """Chunked prefill's form: a chunk's queries are the last rows of its keys (the earlier chunks' cached keys,
    from where the window reaches, then its own). Window 16, chunks starting inside, at and past the window edge,
    of 1 to 37 rows, packed as several prompts in one launch; each row must equal the unchunked prompt's row."""
    window = 16 if sliding else None
    q, k, v = _qkv(70, 4, 2, 32, seed=5)
    whole = _oracle(q, k, v, _cu([70]), window=window)
    chunks = [(s, e, 0 if window is None else max(0, s - window + 1))
              for s, e in ((0, 7), (7, 16), (16, 17), (17, 33), (33, 70), (69, 70))]
    got, ref = _chunk_run(q, k, v, chunks, window)
    _assert(got, ref)
    torch.testing.assert_close(ref, torch.cat([whole[s:e] for s, e, _ in chunks]), rtol=1e-12, atol=1e-12)


def test_chunk_with_an_image_after_cached_keys():
    """Image blocks inside a chunk: ``key_end`` counts in key rows (the rule's key ends shifted by the prefix)."""
    q, k, v = _qkv(60, 4, 2, 32, seed=6)
    blocks = torch.full((60,), -1)
    blocks[30:39] = 0  # 9 soft tokens inside the chunk [24, 60), past the window edge of its first query
    rule = Visibility(window=16, image_blocks=True)
    whole = _oracle(q, k, v, _cu([60]), window=16, key_end=rule.key_end(blocks))
    s, e, lo = 24, 60, 24 - 16 + 1
    got, ref = _chunk_run(q, k, v, [(s, e, lo)], 16, key_end=rule.key_end(blocks[s:e]) + (s - lo))
    _assert(got, ref)
    torch.testing.assert_close(ref, whole[s:e], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", [AttentionConfig(16, 16, 4, 1), AttentionConfig(32, 16, 4, 1),
                                    AttentionConfig(16, 32, 4, 2), AttentionConfig(32, 16, 4, 1, dv_splits=2),
                                    AttentionConfig(16, 16, 4, 1, dv_splits=4), AttentionConfig(16, 16, 4, 1, tma=True),
                                    AttentionConfig(32, 16, 4, 2, tma=True)], ids=str)
def test_tile_shapes_agree(config):
    q, k, v = _qkv(70, 4, 2, 32, seed=3)
    _assert(gemma_prefill_attention(q, k, v, _cu([70]), 70, window=16, config=config),
            _oracle(q, k, v, _cu([70]), window=16))


TMA = AttentionConfig(16, 16, 4, 1, tma=True)


@pytest.mark.parametrize("sliding", [True, False])
def test_tma_head_512_in_two_chunks_packed_with_a_poisoned_neighbour(sliding):
    """The TMA path at head 512: one QKᵀ as two 256-wide chunk products, both output halves from one P. Prompt 1's
    last tiles read the next prompt's rows through the descriptors (a box cannot stop at a prompt's end): NaN
    there must neither leak through the scores (masked) nor through V (zeroed), and prompt 1 must match float64."""
    window = 16 if sliding else None
    q, k, v = _qkv(37 + 30, 4, 2, 512, seed=8)
    k[37:], v[37:] = float("nan"), float("nan")
    got, ref = _run(q, k, v, [37, 30], window=window, config=TMA)
    _assert(got[:37], ref[:37])


def test_tma_chunks_after_cached_keys_and_image_blocks():
    q, k, v = _qkv(60, 4, 2, 512, seed=6)
    blocks = torch.full((60,), -1)
    blocks[30:39] = 0
    rule = Visibility(window=16, image_blocks=True)
    s, e, lo = 24, 60, 24 - 16 + 1
    _assert(*_chunk_run(q, k, v, [(s, e, lo)], 16, key_end=rule.key_end(blocks[s:e]) + (s - lo), config=TMA))


def test_tma_settings_are_checked():
    q, k, v = _qkv(10, 4, 2, 32)
    with pytest.raises(ValueError, match="dv_splits must be 1"):
        AttentionConfig(16, 16, 4, 1, dv_splits=2, tma=True)
    with pytest.raises(TypeError, match="tma must be a bool"):
        AttentionConfig(16, 16, 4, 1, tma=1)
    q3, k3, v3 = _qkv(10, 4, 2, 384)
    with pytest.raises(ValueError, match="head dim"):
        gemma_prefill_attention(q3, k3, v3, _cu([10]), 10, config=TMA)
    odd = torch.randn(10 * 4 * 32 + 1)[1:].view(10, 4, 32)  # 4 bytes past an aligned start
    with pytest.raises(ValueError, match="16-byte aligned"):
        gemma_prefill_attention(odd, k, v, _cu([10]), 10, config=TMA)


def test_zero_tokens():
    q, k, v = _qkv(0, 4, 2, 32)
    assert gemma_prefill_attention(q, k, v, torch.zeros(2, dtype=torch.int32), 1).shape == (0, 4, 32)


@pytest.mark.parametrize("change, exc, match", [
    (lambda a: a.update(q=a["q"][:, :, None]), ValueError, "3-D"),
    (lambda a: a.update(k=a["k"].double(), v=a["v"].double()), TypeError, "one dtype"),
    (lambda a: a.update(q=a["q"].long()), TypeError, "unsupported dtype"),
    (lambda a: a.update(k=a["k"][:5], v=a["v"][:5]), ValueError, "tokens and head_dim"),
    (lambda a: a.update(q=torch.randn(10, 3, 32)), ValueError, "multiple of KV heads"),
    (lambda a: a.update(q=torch.randn(10, 32, 4).transpose(1, 2)), ValueError, "contiguous head_dim"),
    (lambda a: a.update(cu_seqlens=a["cu_seqlens"].long()), ValueError, "int32"),
    (lambda a: a.update(max_seqlen=0), ValueError, "max_seqlen"),
    (lambda a: a.update(window=0), ValueError, "window"),
    (lambda a: a.update(key_end=torch.arange(10)), ValueError, "key_end"),
    (lambda a: a.update(out=torch.empty(10, 4, 16)), ValueError, "out must be"),
    (lambda a: a.update(v=[1, 2]), TypeError, "torch.Tensor"),
    (lambda a: a.update(cu_seqlens_k=a["cu_seqlens"].long()), ValueError, "cu_seqlens_k"),
    (lambda a: a.update(cu_seqlens_k=torch.tensor([0, 9], dtype=torch.int32)), ValueError, "cu_seqlens_k"),
    (lambda a: a.update(k=a["k"][:8], v=a["v"][:8], cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32)),
     ValueError, "at least as many keys as queries"),
])
def test_bad_input_is_a_clear_error(change, exc, match):
    q, k, v = _qkv(10, 4, 2, 32)
    args = dict(q=q, k=k, v=v, cu_seqlens=_cu([10]), max_seqlen=10)
    change(args)
    with pytest.raises(exc, match=match):
        gemma_prefill_attention(**args)


# ---- on a GPU: bf16 and the real shapes -------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_bf16_small():
    """bf16 only on a GPU: the interpreter's bf16 dot is unreliable (the CPU tests use fp32)."""
    _assert(*_run(*_qkv(40, 4, 2, 32, dtype=BF16, device="cuda", seed=7), [40], window=16))


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 1023, 1024, 1025, 4097])
@pytest.mark.parametrize("sliding", [True, False])
def test_gpu_real_shapes_against_float64(n, sliding):
    hq, hkv, d = (16, 8, 256) if sliding else (16, 2, 512)
    _assert(*_run(*_qkv(n, hq, hkv, d, dtype=BF16, device="cuda", seed=n), [n], window=1024 if sliding else None))


GPU_TMA = {512: AttentionConfig(64, 32, 8, 2, tma=True), 256: AttentionConfig(128, 64, 8, 2, tma=True)}


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 1023, 1024, 1025, 4097])
@pytest.mark.parametrize("sliding", [True, False])
def test_gpu_tma_real_shapes_against_float64(n, sliding):
    """The TMA layout (one QKᵀ per 64-row tile at head 512, both output halves in one program) at the real shapes."""
    hq, hkv, d = (16, 8, 256) if sliding else (16, 2, 512)
    _assert(*_run(*_qkv(n, hq, hkv, d, dtype=BF16, device="cuda", seed=n), [n], window=1024 if sliding else None,
                  config=GPU_TMA[d]))


@pytest.mark.gpu
def test_gpu_tma_packed_image_block_and_cached_chunks():
    lengths = [700, 1500, 1]
    n = sum(lengths)
    blocks = torch.full((n,), -1, device="cuda")
    blocks[700 + 1000: 700 + 1280] = 0
    key_end = Visibility(window=1024, image_blocks=True).key_end(blocks)
    _assert(*_run(*_qkv(n, 16, 8, 256, dtype=BF16, device="cuda", seed=1), lengths, window=1024, key_end=key_end,
                  config=GPU_TMA[256]))
    _assert(*_run(*_qkv(n, 16, 2, 512, dtype=BF16, device="cuda", seed=2), lengths, config=GPU_TMA[512]))
    q, k, v = _qkv(1501, 16, 2, 512, dtype=BF16, device="cuda", seed=11)
    _assert(*_chunk_run(q, k, v, [(1024, 1500, 0), (1500, 1501, 0)], None,
                        config=GPU_TMA[512]))


@pytest.mark.gpu
def test_gpu_packed_prompts_and_image_block_at_the_window_edge():
    lengths = [700, 1500, 1]
    n = sum(lengths)
    blocks = torch.full((n,), -1, device="cuda")
    blocks[700 + 1000: 700 + 1280] = 0  # 280 soft tokens straddling key 1024 of the second prompt
    key_end = Visibility(window=1024, image_blocks=True).key_end(blocks)
    _assert(*_run(*_qkv(n, 16, 8, 256, dtype=BF16, device="cuda", seed=1), lengths, window=1024, key_end=key_end))
    q, k, v = _qkv(n, 16, 2, 512, dtype=BF16, device="cuda", seed=2)
    _assert(*_run(q, k, v, lengths))
    _assert(*_run(q.float(), k.float(), v.float(), lengths))  # fp32 takes IEEE dots: parity-grade


@pytest.mark.gpu
@pytest.mark.parametrize("sliding", [True, False])
def test_gpu_real_shapes_chunk_after_cached_keys(sliding):
    """bf16 at the real head shapes: chunks [1024, 1500) and [1500, 1501) of a 1501-token prompt after their
    cached keys (window 1024: the window edge falls inside the cached prefix)."""
    hq, hkv, d = (16, 8, 256) if sliding else (16, 2, 512)
    window = 1024 if sliding else None
    q, k, v = _qkv(1501, hq, hkv, d, dtype=BF16, device="cuda", seed=11)
    chunks = [(s, e, 0 if window is None else max(0, s - window + 1)) for s, e in ((1024, 1500), (1500, 1501))]
    _assert(*_chunk_run(q, k, v, chunks, window))


def test_attention_configs_replace_the_heuristic_per_layer_type():
    """``attention_configs`` (what bench-attention times a model under): calls without ``config=`` take the forced
    settings of their layer type, the same function results, and the heuristic again after the block."""
    from gemma4lab.kernels import attention_configs
    from gemma4lab.lab.hopper_compile import record_launches

    q, k, v = _qkv(40, 4, 2, 32, seed=9)
    cu = _cu([40])
    plain = gemma_prefill_attention(q, k, v, cu, 40, window=16)

    def tiles(**kw):
        with record_launches() as launches:
            out = gemma_prefill_attention(q, k, v, cu, 40, **kw)
        (launch,) = launches
        args = dict(launch.args)
        return out, (args["BLOCK_M"][1], args["BLOCK_N"][1], args["TMA"][1])

    with attention_configs(full=AttentionConfig(32, 16, 4, 1), sliding=AttentionConfig(16, 32, 4, 1, tma=True)):
        forced, used = tiles(window=16)
        assert used == (16, 32, True)
        assert tiles()[1] == (32, 16, False)
        assert tiles(window=16, config=AttentionConfig(32, 32, 4, 1))[1] == (32, 32, False)  # an explicit one wins
    _assert(forced, _oracle(q, k, v, cu, window=16))
    torch.testing.assert_close(forced, plain, rtol=1e-5, atol=1e-5)
    assert tiles(window=16)[1] == (16, 16, False)  # the interpreter's heuristic again
    with pytest.raises(TypeError, match="AttentionConfig"):
        with attention_configs(full=(64, 32)):
            pass
