"""``gemma_qkv_norm_rope_``: per-head q/k/v RMSNorm + (proportional) RoPE, in place."""

from __future__ import annotations

import pytest
import torch
from support import (
    BF16,
    FP32,
    act,
    assert_rounded,
    oracle_rope,
    rms64,
    rope_tables,
    wt,
)

import gemma4lab.kernels as K

pytestmark = pytest.mark.usefixtures("triton_path_only")


def _check(buf, before, n, hq, hkv, dim, qw, kw, cos, sin, dtype, with_k=True):
    c, s = cos.double()[:, None], sin.double()[:, None]
    orig = before.double()
    width = (hq + 2 * hkv) * dim
    ref_q = oracle_rope(rms64(orig[:, : hq * dim].view(n, hq, dim), qw.double()), c, s).view(n, -1)
    assert_rounded(buf[:, : hq * dim], ref_q, dtype)
    if with_k:
        ref_k = oracle_rope(rms64(orig[:, hq * dim : (hq + hkv) * dim].view(n, hkv, dim), kw.double()), c,
                            s).view(n, -1)
        assert_rounded(buf[:, hq * dim : (hq + hkv) * dim], ref_k, dtype)
    ref_v = rms64(orig[:, (hq + hkv) * dim : width].view(n, hkv, dim)).view(n, -1)
    assert_rounded(buf[:, (hq + hkv) * dim : width], ref_v, dtype)


@pytest.mark.parametrize("dtype,n,dim,proportional", [(FP32, 7, 32, False), (BF16, 33, 32, False),
                                                      (BF16, 1, 64, True), (FP32, 5, 64, True)], ids=str)
def test_in_place_matches_float64(gen, dtype, n, dim, proportional):
    hq, hkv, pad = 4, 2, 24
    width = (hq + 2 * hkv) * dim
    buf = act(gen, n, width + pad, dtype=dtype)
    before = buf.clone()
    q, k, v = buf[:, : hq * dim], buf[:, hq * dim : (hq + hkv) * dim], buf[:, (hq + hkv) * dim : width]
    qw, kw = wt(gen, dim, dtype), wt(gen, dim, dtype)
    cos, sin = rope_tables(gen, n, dim, proportional)
    K.gemma_qkv_norm_rope_(q, k, v, qw, kw, cos, sin)
    _check(buf, before, n, hq, hkv, dim, qw, kw, cos, sin, dtype)
    assert torch.equal(buf[:, width:], before[:, width:]), "columns outside q/k/v were written"


def test_without_v_and_without_k(gen):
    n, dim = 5, 32
    q, k = act(gen, n, 2 * dim, dtype=BF16), act(gen, n, dim, dtype=BF16)
    q0, k0 = q.clone(), k.clone()
    qw, kw = wt(gen, dim, BF16), wt(gen, dim, BF16)
    cos, sin = act(gen, n, 2 * dim)[:, :dim], act(gen, n, dim, dtype=BF16)  # strided tables, other row strides
    K.gemma_qkv_norm_rope_(q, k, None, qw, kw, cos, sin)
    c, s = cos.double()[:, None], sin.double()[:, None]
    assert_rounded(q, oracle_rope(rms64(q0.double().view(n, 2, dim), qw.double()), c, s).view(n, -1), BF16)
    assert_rounded(k, oracle_rope(rms64(k0.double().view(n, 1, dim), kw.double()), c, s).view(n, -1), BF16)
    q1 = q0.clone()
    K.gemma_qkv_norm_rope_(q1, None, None, qw, None, cos, sin)
    assert_rounded(q1, oracle_rope(rms64(q0.double().view(n, 2, dim), qw.double()), c, s).view(n, -1), BF16)


def test_zero_tokens(gen):
    q = torch.empty(0, 64)
    assert K.gemma_qkv_norm_rope_(q, q, q, wt(gen, 32), wt(gen, 32), torch.empty(0, 32), torch.empty(0, 32)) is None


def test_rejects():
    n, dim = 3, 32
    q, k, v, w = torch.randn(n, 4 * dim), torch.randn(n, dim), torch.randn(n, dim), torch.ones(dim)
    cs = torch.randn(n, dim)
    call = K.gemma_qkv_norm_rope_
    with pytest.raises(ValueError, match="k_weight has 16 elements, expected 32 \\(head_dim\\)"):
        call(q, k, v, w, torch.ones(16), cs, cs)
    with pytest.raises(ValueError, match="not a multiple of head_dim"):
        call(torch.randn(n, 100), k, v, w, w, cs, cs)
    with pytest.raises(ValueError, match="cos must have shape"):
        call(q, k, v, w, w, torch.randn(n, dim // 2), cs)
    with pytest.raises(ValueError, match="sin must have shape"):
        call(q, k, v, w, w, cs, torch.randn(n + 1, dim))
    with pytest.raises(TypeError, match="cos has dtype"):
        call(q, k, v, w, w, cs.half(), cs)
    with pytest.raises(ValueError, match="k_weight is required"):
        call(q, k, v, w, None, cs, cs)
    with pytest.raises(TypeError, match="v has dtype"):
        call(q, k, v.to(BF16), w, w, cs, cs)
    with pytest.raises(ValueError, match="k has 2 tokens"):
        call(q, torch.randn(2, dim), v, w, w, cs, cs)
    with pytest.raises(ValueError, match="contiguous last dim"):
        call(torch.randn(4 * dim, n).t(), k, v, w, w, cs, cs)
    with pytest.raises(ValueError, match="even"):
        call(torch.randn(n, 9), None, None, torch.ones(3), None, torch.randn(n, 3), torch.randn(n, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("dim,hkv", [(256, 8), (512, 2)])
def test_gpu_real_shapes(gen, dim, hkv):
    n, hq = 300, 16
    buf = act(gen, n, (hq + 2 * hkv) * dim, dtype=BF16).cuda()
    before = buf.clone()
    q, k, v = buf[:, : hq * dim], buf[:, hq * dim : (hq + hkv) * dim], buf[:, (hq + hkv) * dim :]
    qw, kw = wt(gen, dim, BF16).cuda(), wt(gen, dim, BF16).cuda()
    cos, sin = (t.cuda() for t in rope_tables(gen, n, dim, proportional=dim == 512))
    K.gemma_qkv_norm_rope_(q, k, v, qw, kw, cos, sin)
    _check(buf, before, n, hq, hkv, dim, qw, kw, cos, sin, BF16)


@pytest.mark.parametrize("dtype,n,dim", [(FP32, 7, 32), (BF16, 20, 24), (FP32, 1, 72)], ids=str)
def test_axial_rope_of_the_vision_tower_matches_float64(gen, dtype, n, dim):
    """``axial=True``: the vision tower's 2-D RoPE (rotate_half within each half of the head, cos/sin laid out
    ``[x, x, y, y]``) against the model's own float64 formula (``vision.apply_axial_rope`` on the weighted norm);
    24 and 72 (the real config's head dim) leave quarters that are not powers of two (masked lanes)."""
    from gemma4lab.model.vision import apply_axial_rope, axial_cos_sin, axial_inv_freq

    hq = hkv = 3
    side = int(n**0.5) + 1
    pos = torch.stack([torch.arange(n) % side, torch.arange(n) // side], -1)[None]  # [1, n, 2] (column, row)
    cos, sin = (t[0] for t in axial_cos_sin(axial_inv_freq(dim, 100.0), pos, torch.float32))
    buf = act(gen, n, (hq + 2 * hkv) * dim, dtype=dtype)
    before = buf.clone()
    qw, kw = wt(gen, dim, dtype), wt(gen, dim, dtype)
    q, k, v = buf[:, : hq * dim], buf[:, hq * dim: 2 * hq * dim], buf[:, 2 * hq * dim:]
    K.gemma_qkv_norm_rope_(q, k, v, qw, kw, cos, sin, axial=True)
    orig = before.double().view(n, 3 * hq, dim)
    c, s = cos.double()[None], sin.double()[None]
    for i, w in ((0, qw), (1, kw)):
        ref = apply_axial_rope(rms64(orig[:, i * hq:(i + 1) * hq], w.double())[None], c, s)[0]
        assert_rounded(buf.view(n, 3 * hq, dim)[:, i * hq:(i + 1) * hq], ref, dtype)
    assert_rounded(buf.view(n, 3 * hq, dim)[:, 2 * hq:], rms64(orig[:, 2 * hq:]), dtype)
    ref_twin = before.clone()
    K.gemma_qkv_norm_rope_ref_(ref_twin[:, : hq * dim], ref_twin[:, hq * dim: 2 * hq * dim],
                               ref_twin[:, 2 * hq * dim:], qw, kw, cos, sin, axial=True)
    assert_rounded(ref_twin.view(n, 3 * hq, dim), buf.view(n, 3 * hq, dim).double(), dtype, roundings=2)
    with pytest.raises(ValueError, match="multiple of 4"):
        K.gemma_qkv_norm_rope_(q[:, :hq * 6], None, None, qw[:6], None, cos[:, :6], sin[:, :6], axial=True)
    with pytest.raises(TypeError, match="axial must be a bool"):
        K.gemma_qkv_norm_rope_(q, k, v, qw, kw, cos, sin, axial=1)
