"""``gemma_decode_attention``: one new token per sequence against the static KV cache (full layers and rings)."""

from __future__ import annotations

import pytest
import torch
from support import BF16, FP32, assert_rounded

from gemma4lab.attention import BACKENDS, Visibility
from gemma4lab.kernels import gemma_decode_attention, gemma_decode_attention_ref

pytestmark = pytest.mark.usefixtures("triton_path_only")


def _cache(b, hkv, slots, d, dtype=FP32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b + 1, hkv, slots, d, generator=g).to(dtype).to(device) for _ in range(2))


def _ring(pos, w, young: bool):
    """slot -> position of a ring of ``w`` slots after writing positions 0..pos (-1 where never written)."""
    sp = torch.full((w,), -1)
    for p in range(pos + 1):
        sp[p % w] = p
    return sp


@pytest.mark.parametrize("d", [32, 24])
def test_full_layer_against_float64_and_the_rule(d):
    kc, vc = _cache(3, 2, 40, d, seed=d)
    q = torch.randn(3, 4, d)
    pos = torch.tensor([0, 17, 39])
    got = gemma_decode_attention(q, kc, vc, pos)
    ref = gemma_decode_attention_ref(q.double(), kc.double(), vc.double(), pos)
    assert_rounded(got, ref, FP32, math_err=1e-5)
    rule = BACKENDS["sdpa"].decode(q.double(), kc.double(), vc.double(), pos, None, Visibility())
    torch.testing.assert_close(ref, rule, rtol=1e-12, atol=1e-12)  # the kernel's reference = the rule's decode form


def test_sliding_ring_against_float64_and_the_rule():
    w = 16
    kc, vc = _cache(2, 2, w, 32, seed=1)
    pos = torch.tensor([5, 40])
    slot_pos = torch.stack([_ring(5, w, True), _ring(40, w, False), _ring(0, w, True)])
    q = torch.randn(2, 4, 32)
    got = gemma_decode_attention(q, kc, vc, pos, slot_pos=slot_pos, window=w)
    ref = gemma_decode_attention_ref(q.double(), kc.double(), vc.double(), pos, slot_pos=slot_pos, window=w)
    assert_rounded(got, ref, FP32, math_err=1e-5)
    rule = BACKENDS["sdpa"].decode(q.double(), kc.double(), vc.double(), pos, slot_pos, Visibility(window=w))
    torch.testing.assert_close(ref, rule, rtol=1e-12, atol=1e-12)


def test_bad_input():
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, FP32])
@pytest.mark.parametrize("sliding", [True, False])
def test_gpu_real_shapes_against_float64(dtype, sliding):
    """Head 256 on a 1024-slot ring, head 512 over 4097 cached positions; batch 3 at different positions."""
    hkv, d, slots = (8, 256, 1024) if sliding else (2, 512, 4097)
    kc, vc = _cache(3, hkv, slots, d, dtype=dtype, device="cuda", seed=slots)
    q = torch.randn(3, 16, d).to(dtype).cuda()
    pos = torch.tensor([0, 1500, 4000] if sliding else [0, 1024, 4096], device="cuda")
    slot_pos = torch.stack([_ring(int(p), slots, True) for p in pos] + [_ring(0, slots, True)]).cuda() \
        if sliding else None
    got = gemma_decode_attention(q, kc, vc, pos, slot_pos=slot_pos, window=slots if sliding else None)
    ref = gemma_decode_attention_ref(q.double(), kc.double(), vc.double(), pos, slot_pos=slot_pos,
                                     window=slots if sliding else None)
    assert_rounded(got, ref, dtype, math_err=1e-5 if dtype == FP32 else 2**-8)
