"""``gemma_moe_pair``: both expert GEMMs in one launch (gate/up tiles, then down tiles that wait for their expert).
It promises the two-launch path's bits (``gemma_moe_gemm`` twice, whose accuracy against float64 is tested in
``test_moe_gemm.py``) and checks that promise here, plus its own float64 check, under the CPU interpreter in fp32
and compiled on a GPU in bf16 — where the waiting between programs of one launch is real."""

from __future__ import annotations

import pytest
import torch
from support import BF16, FP32, assert_rounded, routed_case

import gemma4lab.kernels as K
from gemma4lab.kernels.moe_pair import (
    PairConfig,
    gemma_moe_pair,
    gemma_moe_pair_ref,
    pair_config,
    sync_size,
)

pytestmark = pytest.mark.usefixtures("triton_path_only")

POISON = -7


def _two_launches(x, w, wd, offs, slots, k, su=None, sd=None, a_fp8=False):
    h = K.gemma_moe_gemm(x, w, offs, row_index=slots, top_k=k, w_scale=su, a_fp8=a_fp8)
    return K.gemma_moe_gemm(h, wd, offs, gelu_gate=True, w_scale=sd, a_fp8=a_fp8)


def _routed(t, k, n_experts, device="cpu", dtype=FP32, h=96, i=40, seed=0):
    x, ids, w, wd = routed_case(t, k, n_experts, h=h, i=i, dtype=dtype, device=device, seed=seed)
    sync = torch.full((sync_size(t * k, n_experts),), POISON, dtype=torch.int32, device=device)
    offs, slots, _ = K.gemma_moe_route(ids, n_experts, sync=sync)
    return x, w, wd, offs, slots, sync


def _poisoned_call(x, w, wd, offs, slots, k, sync, **kw):
    """The registered op on NaN-filled outputs: every sorted row must be written."""
    m = slots.numel()
    h = torch.full((m, w.shape[1]), float("nan"), dtype=x.dtype, device=x.device)
    out = torch.full((m, w.shape[2]), float("nan"), dtype=x.dtype, device=x.device)
    torch.ops.gemma4lab.moe_pair(x, w, wd, offs, slots, k, kw.get("su"), kw.get("sd"), kw.get("a_fp8", False), sync,
                                 h, out)
    return h, out


# (tokens, top_k, experts): fewer routed rows than experts (the compact expert lookup), as many, more; one token
@pytest.mark.parametrize("t,k,n_experts", [(1, 2, 8), (3, 2, 8), (9, 2, 8), (13, 3, 16)])
def test_matches_two_launches_bit_for_bit_and_float64(t, k, n_experts):
    x, w, wd, offs, slots, sync = _routed(t, k, n_experts)
    assert (sync == 0).all(), "moe_route did not zero the pair's counters"
    h, y = _poisoned_call(x, w, wd, offs, slots, k, sync)
    two = _two_launches(x, w, wd, offs, slots, k)
    assert torch.equal(y, two), "the one launch must write the two launches' bits"
    assert torch.equal(h, K.gemma_moe_gemm(x, w, offs, row_index=slots, top_k=k))
    exact = gemma_moe_pair_ref(x.double(), w.double(), wd.double(), offs, slots, k)
    assert_rounded(y, exact, FP32, math_err=2e-6 * 4)  # two fp32 dots of ~100 terms (test_moe_gemm's bound)


def test_sync_zeroed_by_routing_and_left_dirty():
    """The counters are the route's business: it zeroes them in its launch, so a second pair on the same buffer
    without routing again would be wrong — the wrapper's own default is a fresh zeroed buffer."""
    x, w, wd, offs, slots, sync = _routed(5, 2, 8)
    y = gemma_moe_pair(x, w, wd, offs, slots, top_k=2, sync=sync)
    assert int(sync[0]) >= 1 and (sync[1:] > 0).any(), "the launch used the counters"
    assert torch.equal(y, gemma_moe_pair(x, w, wd, offs, slots, top_k=2))  # sync=None: zeros of its own
    K.gemma_moe_route(torch.zeros(1, 2, dtype=torch.int64), 8, sync=sync)
    assert (sync == 0).all()


def test_fp8_weights_and_activations_match_two_launches():
    from gemma4lab.model.quantize import quantize_fp8_per_channel

    x, w, wd, offs, slots, sync = _routed(4, 2, 8, h=300, i=140)
    (q, s), (qd, sd) = quantize_fp8_per_channel(w), quantize_fp8_per_channel(wd)
    for a_fp8 in (False, True):
        sync.zero_()
        _, y = _poisoned_call(x, q, qd, offs, slots, 2, sync, su=s, sd=sd, a_fp8=a_fp8)
        assert torch.equal(y, _two_launches(x, q, qd, offs, slots, 2, s, sd, a_fp8))


def test_bad_calls_get_clear_errors():
    x, w, wd, offs, slots, sync = _routed(3, 2, 8)
    with pytest.raises(ValueError, match="row_index"):
        gemma_moe_pair(x, w, wd, offs, None, top_k=2)
    with pytest.raises(ValueError, match="w_down must be"):
        gemma_moe_pair(x, w, wd[:, :, :-1], offs, slots, top_k=2)
    with pytest.raises(ValueError, match="sync must be"):
        gemma_moe_pair(x, w, wd, offs, slots, top_k=2, sync=sync[:2])
    with pytest.raises(ValueError, match="sync must be"):
        gemma_moe_pair(x, w, wd, offs, slots, top_k=2, sync=sync.long())
    with pytest.raises(ValueError, match="share a dtype"):
        gemma_moe_pair(x, w, wd.double(), offs, slots, top_k=2)
    with pytest.raises(ValueError, match="offsets"):
        gemma_moe_pair(x, w, wd, offs.long(), slots, top_k=2)
    base = pair_config(6, 8)
    with pytest.raises(ValueError, match="num_warps"):
        PairConfig(base.up, K.MoeConfig(num_warps=8))
    with pytest.raises(ValueError, match="programs_per_sm"):
        PairConfig(base.up, base.down, 0)
    with pytest.raises(TypeError, match="PairConfig"):
        gemma_moe_pair(x, w, wd, offs, slots, top_k=2, config=base.up)
    with pytest.raises(ValueError, match="sync"):
        K.gemma_moe_route(torch.zeros(1, 2, dtype=torch.int64), 8, sync=torch.zeros(3))


# ---- on the GPU: the real shapes, real concurrency ----------------------------------------------------------------
def _real(t, seed=0):
    x, ids, w, wd = routed_case(t, 8, 128, h=2816, i=704, dtype=BF16, device="cuda", seed=seed)
    return x, ids, w, wd


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 2, 3, 5, 8, 13, 16])
def test_gpu_real_shapes_match_two_launches_bit_for_bit(t):
    x, ids, w, wd = _real(t)
    sync = torch.full((sync_size(t * 8, 128),), POISON, dtype=torch.int32, device="cuda")
    offs, slots, _ = K.gemma_moe_route(ids, 128, sync=sync)
    h, y = _poisoned_call(x, w, wd, offs, slots, 8, sync)
    assert torch.equal(y, _two_launches(x, w, wd, offs, slots, 8))
    assert torch.equal(h, K.gemma_moe_gemm(x, w, offs, row_index=slots, top_k=8))
    # and with many more programs than can be resident at once (the tickets keep that deadlock-free)
    for pps in (1, 8):
        cfg = PairConfig(pair_config(t * 8, 128).up, pair_config(t * 8, 128).down, pps)
        assert torch.equal(gemma_moe_pair(x, w, wd, offs, slots, top_k=8, config=cfg), y)


@pytest.mark.gpu
def test_gpu_fp8_matches_two_launches():
    from gemma4lab.model.quantize import quantize_fp8_per_channel

    x, ids, w, wd = _real(4)
    (q, s), (qd, sd) = quantize_fp8_per_channel(w), quantize_fp8_per_channel(wd)
    offs, slots, _ = K.gemma_moe_route(ids, 128)
    for a_fp8 in (False, True):
        y = gemma_moe_pair(x, q, qd, offs, slots, top_k=8, up_scale=s, down_scale=sd, a_fp8=a_fp8)
        assert torch.equal(y, _two_launches(x, q, qd, offs, slots, 8, s, sd, a_fp8))


@pytest.mark.gpu
def test_gpu_graph_replays_fresh_routing_beside_a_busy_stream():
    """Captured once (route zeroing the counters, then the pair, with dependent launch), replayed on new routings
    while a second stream keeps SMs busy with GEMMs: every replay equals the two launches run eagerly."""
    x, ids, w, wd = _real(2)
    static_x, static_ids = x.clone(), ids.clone()
    sync = torch.empty(sync_size(16, 128), dtype=torch.int32, device="cuda")

    def step():
        offs, slots, _ = K.gemma_moe_route(static_ids, 128, sync=sync)
        return gemma_moe_pair(static_x, w, wd, offs, slots, top_k=8, sync=sync)

    side = torch.cuda.Stream()
    with K.dependent_launch():
        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = step()
    busy = torch.randn(4096, 4096, device="cuda", dtype=BF16)
    for seed in range(1, 4):
        nx, nids, _, _ = _real(2, seed=seed)
        static_x.copy_(nx)
        static_ids.copy_(nids)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(4):
                busy = busy @ busy * 0.01
        graph.replay()
        torch.cuda.synchronize()
        offs, slots, _ = K.gemma_moe_route(nids, 128)
        assert torch.equal(static_y, _two_launches(nx, w, wd, offs, slots, 8)), f"replay {seed}"
