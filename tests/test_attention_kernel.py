"""The Triton prefill attention kernel (under the interpreter on CPU, compiled on a GPU) against float64 oracles."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from gemma4lab.attention import mask_for_prompt
from gemma4lab.kernels import INTERPRET
from gemma4lab.kernels.attention import (
    AttentionConfig,
    gemma_prefill_attention,
    gemma_prefill_attention_ref,
    key_end_for_blocks,
)

needs_kernel = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                  reason="needs TRITON_INTERPRET=1 or a GPU to run the Triton kernel")


def _qkv(n, hq, hkv, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    # q/k have unit-RMS rows after Gemma's q/k norms, so scores are O(√d) with scale 1.0: keep that regime.
    q, k, v = (torch.randn(n, h, d, generator=g, device=device, dtype=torch.float32).to(dtype)
               for h in (hq, hkv, hkv))
    return q, k, v


def _cu(lengths, device="cpu"):
    return torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)


def _oracle(q, k, v, cu, **kw):
    return gemma_prefill_attention_ref(q.double(), k.double(), v.double(), cu, **kw)


def _run(q, k, v, lengths, **kw):
    cu = _cu(lengths, q.device)
    out = torch.full_like(q, float("nan"))  # poisoned: every real element must be written
    got = gemma_prefill_attention(q, k, v, cu, max(lengths), out=out, **kw)
    assert got is out and torch.isfinite(got).all()
    return got, _oracle(q, k, v, cu, **kw)


def test_reference_mask_agrees_with_the_model_mask():
    """key_end + window express exactly the reference mask: causal, window, bidirectional image blocks."""
    blocks = torch.tensor([-1, -1, 0, 0, 0, -1, 1, 1, -1, -1, -1, -1])
    ends = key_end_for_blocks(blocks)
    n, w = 12, 4
    rows = torch.arange(n)
    for sliding in (True, False):
        mine = rows[None, :] < (ends if sliding else rows + 1)[:, None]
        if sliding:
            mine &= rows[None, :] > rows[:, None] - w
        else:
            mine &= torch.ones(n, n, dtype=torch.bool)
        assert torch.equal(mine, mask_for_prompt(n, sliding, w, blocks if sliding else None, "cpu"))


@needs_kernel
@pytest.mark.parametrize("lengths", [[1], [15], [16], [17], [65], [5, 40, 1, 23]])
def test_full_layer_causal_gqa(lengths):
    q, k, v = _qkv(sum(lengths), 4, 1, 64, seed=len(lengths))
    got, ref = _run(q, k, v, lengths)
    assert rel_err(got, ref) <= 1e-5


@needs_kernel
@pytest.mark.parametrize("lengths", [[1], [15], [16], [17], [65], [3, 33, 18]])
def test_sliding_layer_window_edges(lengths):
    """Window 16 with lengths 15/16/17/65: the 1023/1024/1025/4097 cases of the real window, scaled down."""
    q, k, v = _qkv(sum(lengths), 4, 2, 32, seed=sum(lengths))
    got, ref = _run(q, k, v, lengths, window=16)
    assert rel_err(got, ref) <= 1e-5


@needs_kernel
def test_odd_head_dim_and_strided_views():
    """Head dim 24 (masked lanes) and q/k/v as column views of one fused projection (row stride > heads·dim)."""
    n, hq, hkv, d = 29, 2, 1, 24
    fused = torch.randn(n, (hq + 2 * hkv) * d + 8)
    q = fused[:, : hq * d].view(n, hq, d)
    k = fused[:, hq * d: (hq + hkv) * d].view(n, hkv, d)
    v = fused[:, (hq + hkv) * d: (hq + 2 * hkv) * d].view(n, hkv, d)
    got, ref = _run(q, k, v, [11, 18], window=8)
    assert rel_err(got, ref) <= 1e-5
    cfg = AttentionConfig(16, 16, 4, 1, dv_splits=2)  # the second program's lanes 24..31 are masked
    got = gemma_prefill_attention(q, k, v, _cu([11, 18]), 18, config=cfg)
    assert rel_err(got, _oracle(q, k, v, _cu([11, 18]))) <= 1e-5


@needs_kernel
@pytest.mark.parametrize("start", [0, 9, 14, 30])
def test_image_blocks_on_sliding_layers(start):
    """An image of 9 soft tokens, bidirectional inside, placed around the window edge (window 16)."""
    lengths = [12, 48]
    n = sum(lengths)
    blocks = torch.full((n,), -1)
    blocks[12 + start: 12 + start + 9] = 0
    blocks[2:5] = 1  # a second image in the first prompt
    q, k, v = _qkv(n, 4, 2, 32, seed=start)
    got, ref = _run(q, k, v, lengths, window=16, key_end=key_end_for_blocks(blocks))
    assert rel_err(got, ref) <= 1e-5
    # and the oracle is the model's own masked reference
    from gemma4lab.attention import PackedBatch, sdpa_attention

    batch = PackedBatch.from_lengths(lengths, block_ids=blocks)
    model_ref = sdpa_attention(q.double(), k.double(), v.double(), batch, True, 16)
    assert rel_err(ref, model_ref) <= 1e-12


@needs_kernel
@pytest.mark.parametrize("config", [AttentionConfig(16, 16, 4, 1), AttentionConfig(32, 16, 4, 1),
                                    AttentionConfig(16, 32, 4, 2), AttentionConfig(32, 16, 4, 1, dv_splits=2),
                                    AttentionConfig(16, 16, 4, 1, dv_splits=4)])
def test_tile_shapes_agree(config):
    q, k, v = _qkv(70, 4, 2, 32, seed=3)
    cu = _cu([70])
    ref = _oracle(q, k, v, cu, window=16)
    assert rel_err(gemma_prefill_attention(q, k, v, cu, 70, window=16, config=config), ref) <= 1e-5


@pytest.mark.gpu
def test_gpu_bf16_small_matches_oracle_to_rounding():
    """bf16 only on a GPU: the interpreter's bf16 dot is unreliable (the CPU tests use fp32)."""
    q, k, v = _qkv(40, 4, 2, 32, dtype=torch.bfloat16, device="cuda", seed=7)
    got, ref = _run(q, k, v, [40], window=16)
    assert rel_err(got, ref) <= 3 * rel_err(ref.bfloat16(), ref) + 5e-3


def test_zero_tokens():
    q, k, v = _qkv(0, 4, 2, 32)
    cu = torch.zeros(2, dtype=torch.int32)
    assert gemma_prefill_attention(q, k, v, cu, 1).shape == (0, 4, 32)


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
])
def test_bad_input_is_a_clear_error(change, exc, match):
    q, k, v = _qkv(10, 4, 2, 32)
    args = dict(q=q, k=k, v=v, cu_seqlens=_cu([10]), max_seqlen=10)
    change(args)
    with pytest.raises(exc, match=match):
        gemma_prefill_attention(**args)


# ---- on a GPU: the real shapes --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 1023, 1024, 1025, 4097])
@pytest.mark.parametrize("sliding", [True, False])
def test_gpu_real_shapes_against_float64(n, sliding):
    hq, hkv, d = (16, 8, 256) if sliding else (16, 2, 512)
    q, k, v = _qkv(n, hq, hkv, d, dtype=torch.bfloat16, device="cuda", seed=n)
    got, ref = _run(q, k, v, [n], window=1024 if sliding else None)
    assert rel_err(got, ref) <= 3 * rel_err(ref.bfloat16(), ref) + 5e-3


@pytest.mark.gpu
def test_gpu_packed_prompts_and_image_block_at_the_window_edge():
    lengths = [700, 1500, 1]
    n = sum(lengths)
    blocks = torch.full((n,), -1, device="cuda")
    blocks[700 + 1000: 700 + 1280] = 0  # 280 soft tokens straddling key 1024 of the second prompt
    q, k, v = _qkv(n, 16, 8, 256, dtype=torch.bfloat16, device="cuda", seed=1)
    got, ref = _run(q, k, v, lengths, window=1024, key_end=key_end_for_blocks(blocks))
    assert rel_err(got, ref) <= 3 * rel_err(ref.bfloat16(), ref) + 5e-3
    q, k, v = _qkv(n, 16, 2, 512, dtype=torch.bfloat16, device="cuda", seed=2)
    got, ref = _run(q, k, v, lengths)
    assert rel_err(got, ref) <= 3 * rel_err(ref.bfloat16(), ref) + 5e-3
    q32, k32, v32 = (t.float() for t in (q, k, v))  # fp32 takes IEEE dots: parity-grade
    got32, ref32 = _run(q32, k32, v32, lengths)
    assert rel_err(got32, ref32) <= 1e-5


# ---- decode: one token against the static KV cache -------------------------------------------------------------
from gemma4lab.kernels.decode_attention import gemma_decode_attention, gemma_decode_attention_ref  # noqa: E402


def _cache(b, hkv, slots, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(b + 1, hkv, slots, d, generator=g, device=device).to(dtype) for _ in range(2))


@needs_kernel
@pytest.mark.parametrize("d", [32, 24])
def test_decode_full_layer(d):
    kc, vc = _cache(3, 2, 40, d, seed=d)
    q = torch.randn(3, 4, d)
    pos = torch.tensor([0, 17, 39])
    got = gemma_decode_attention(q, kc, vc, pos)
    ref = gemma_decode_attention_ref(q.double(), kc.double(), vc.double(), pos)
    assert rel_err(got, ref) <= 1e-5
    # the oracle is the model's masked SDPA over the cache
    from gemma4lab.runtime.generation import decode_attention

    mask = torch.arange(40)[None, :] <= pos[:, None]
    assert rel_err(ref, decode_attention(q.double(), kc[:3].double(), vc[:3].double(), mask[:, None, None])) < 1e-12


@needs_kernel
def test_decode_sliding_ring():
    w = 16
    kc, vc = _cache(2, 2, w, 32, seed=1)
    pos = torch.tensor([5, 40])
    slot_pos = torch.full((3, w), -1)
    slot_pos[0, :6] = torch.arange(6)  # a young ring: 10 empty slots
    slot_pos[1] = torch.tensor([(40 - ((40 - s) % w)) for s in range(w)])  # a full ring around position 40
    q = torch.randn(2, 4, 32)
    got = gemma_decode_attention(q, kc, vc, pos, slot_pos=slot_pos, window=w)
    ref = gemma_decode_attention_ref(q.double(), kc.double(), vc.double(), pos, slot_pos=slot_pos, window=w)
    assert rel_err(got, ref) <= 1e-5


def test_decode_bad_input():
    kc, vc = _cache(1, 2, 8, 32)
    q = torch.randn(1, 4, 32)
    with pytest.raises(ValueError, match="positions"):
        gemma_decode_attention(q, kc, vc, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="window and slot_pos"):
        gemma_decode_attention(q, kc, vc, torch.tensor([1]), window=4)
    with pytest.raises(TypeError, match="share a float dtype"):
        gemma_decode_attention(q.double(), kc, vc, torch.tensor([1]))
    with pytest.raises(ValueError, match="does not fit"):
        gemma_decode_attention(torch.randn(1, 3, 32), kc, vc, torch.tensor([1]))
