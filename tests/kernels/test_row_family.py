"""What the four row-norm kernels share: the persistent, pipelined layout and its launch settings. A row's bits may
not depend on how many rows share the call, nor on the grid (a GPU bug once gave different bits for some rows at
1025 vs 1280 tokens)."""

from __future__ import annotations

import pytest
import torch
from support import (
    BF16,
    FP32,
    act,
    assert_rounded,
    d,
    oracle_dual,
    oracle_dual_next,
    oracle_post_attention,
    oracle_rms_res,
    wt,
)

import gemma4lab.kernels as K
from gemma4lab.kernels import _common as C

pytestmark = pytest.mark.usefixtures("triton_path_only")
ROW_KERNELS = ["rms", "dual", "dual_next", "post_attention"]


def row_case(name, gen, n, h, dtype):
    """One row kernel on fresh inputs: (acts, run, oracle). ``run(acts, cfg)`` returns the list of outputs for the
    ``[tokens, h]`` activations ``acts`` (any leading row slice of them works); ``oracle`` is the float64 truth."""
    w = [wt(gen, h, dtype) for _ in range(4)]
    s = torch.tensor([0.7])
    if name == "rms":
        acts = [act(gen, n, h, dtype=dtype), act(gen, n, h, dtype=dtype)]
        return (acts, lambda a, cfg=None: [K.gemma_rmsnorm_residual_scalar(a[0], w[0], a[1], s, config=cfg)],
                [oracle_rms_res(*d(acts[0], w[0], acts[1], s))])
    if name in ("dual", "dual_next"):
        acts = [act(gen, n, h, dtype=dtype), act(gen, n, h, dtype=dtype, scale=3.0), act(gen, n, h, dtype=dtype)]
        args = lambda a: (a[0], w[0], a[1], w[1], w[2], a[2], s)  # noqa: E731
        if name == "dual":
            return (acts, lambda a, cfg=None: [K.gemma_dual_rmsnorm_residual_scalar(*args(a), config=cfg)],
                    [oracle_dual(*d(*args(acts)))])
        return (acts, lambda a, cfg=None: list(K.gemma_dual_rmsnorm_residual_scalar_next_norm(*args(a), w[3],
                                                                                              config=cfg)),
                list(oracle_dual_next(*d(*args(acts), w[3]), dtype)))
    acts = [act(gen, n, h, dtype=dtype, scale=4.0), act(gen, n, h, dtype=dtype)]
    return (acts, lambda a, cfg=None: list(K.gemma_post_attention_block(a[0], a[1], *w, config=cfg)),
            list(oracle_post_attention(*d(*acts, *w), dtype)))


@pytest.mark.parametrize("name", ROW_KERNELS)
@pytest.mark.parametrize("config", [C.RowConfig(1, 4, 3, 1), C.RowConfig(3, 2, 2, 4)], ids=str)
def test_persistent_loop_many_rows_per_program(gen, name, config):
    """num_sms is 1 on CPU: 1-3 programs each loop over many row blocks (pipelined), including a partial last
    block (ROWS=4 with 23 rows) and programs that get one block more than others."""
    assert C.num_sms(torch.device("cpu")) == 1
    acts, run, refs = row_case(name, gen, 23, 200, BF16)
    for got, ref in zip(run(acts, config), refs):
        assert_rounded(got, ref, BF16)


@pytest.mark.parametrize("name", ROW_KERNELS)
@pytest.mark.parametrize("dtype,h", [(BF16, 200), (FP32, 96), (BF16, 2816)], ids=str)
def test_row_result_independent_of_row_count(gen, name, dtype, h):
    n, k = (9, 14) if h < 1024 else (3, 4)
    acts, run, _ = row_case(name, gen, n + k, h, dtype)
    full = run(acts)
    for cfg in (None, C.RowConfig(1, 4, 1, 1), C.RowConfig(4, 4, 3, 1)):
        for a, b in zip(run([a[:n] for a in acts], cfg), full):
            assert torch.equal(a, b[:n])
    for a, b in zip(run([a[: n + 1] for a in acts]), full):  # different grid size / last-block parity
        assert torch.equal(a, b[: n + 1])


@pytest.mark.parametrize("hidden", [96, 200, 1024, 2816, 4096, 16384])
@pytest.mark.parametrize("dtype", [BF16, FP32])
@pytest.mark.parametrize("streams", [2, 3])
def test_row_heuristic_properties(hidden, dtype, streams):
    """What the heuristic promises (not which numbers it picks): a tile of at most 16 rows covering the whole row,
    one row per program at hidden >= 2048, the pipelined rows within ~96 KB of shared memory (one stage at least),
    and a layout (tile, rows, warps) that depends on (hidden, dtype) only — never on the number of rows; only the
    grid and the pipeline depth follow the row count (short launches unpipelined)."""
    cfg = C.row_config(hidden, dtype, streams)
    block = 1 << (hidden - 1).bit_length()
    assert 1 <= cfg.rows <= 16 and (cfg.rows == 1 or hidden < 2048)
    bytes_per_stage = streams * cfg.rows * block * (4 if dtype == FP32 else 2)
    assert cfg.num_stages == 1 or cfg.num_stages * bytes_per_stage <= 96 * 1024
    dev = torch.device("cpu")
    rows = C.row_launch(1, hidden, dtype, dev, streams)[1]["ROWS"]  # the interpreter takes taller tiles
    assert rows == cfg.rows or C.INTERPRET and rows > cfg.rows
    (g1,), m1 = C.row_launch(64 * rows + 1, hidden, dtype, dev, streams)
    (g2,), m2 = C.row_launch(80 * rows, hidden, dtype, dev, streams)
    assert m1 == m2 and g1 <= g2 <= cfg.programs_per_sm * C.num_sms(dev)
    (g0,), m0 = C.row_launch(rows, hidden, dtype, dev, streams)  # one block: a short launch
    layout = ("H", "BLOCK", "ROWS", "num_warps")
    assert {k: m0[k] for k in layout} == {k: m1[k] for k in layout} and m0["STAGES"] == 1 and g0 == 1


def test_launch_settings_validate():
    with pytest.raises(ValueError, match="power of two"):
        C.RowConfig(num_warps=3)
    with pytest.raises(ValueError, match=">= 1"):
        C.RowConfig(programs_per_sm=0)
    for cls, args in ((K.ElementwiseConfig, (300, 4)), (K.RouterConfig, (3, 4)), (K.HeadConfig, (4, 6)),
                      (K.MoeConfig, (16, 100)), (K.CombineConfig, (5,)), (K.DecodeConfig, (24,)),
                      (K.AttentionConfig, (16, 16, 3, 1))):
        with pytest.raises(ValueError, match="power of two"):
            cls(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_gpu_short_and_long_launches_give_the_same_bits(dtype):
    """At the real hidden size, the rows of a short launch (unpipelined, 4 programs per SM) equal the same rows of a
    long, pipelined launch bit for bit, for every row kernel: PCG pads prompts to buckets on either side of the
    switch (``SHORT_LAUNCH_BLOCKS_PER_SM``)."""
    g = torch.Generator().manual_seed(5)
    h, dev = 2816, torch.device("cuda")
    n_long = C.SHORT_LAUNCH_BLOCKS_PER_SM * C.num_sms(dev) + 37
    x1, x2, r = ((torch.randn(n_long, h, generator=g) * sc).to(dev, dtype) for sc in (1.0, 3.0, 1.0))
    w = [(1 + 0.1 * torch.randn(h, generator=g)).to(dev, dtype) for _ in range(4)]
    s = torch.tensor([0.7], device=dev)
    calls = {
        "rms": lambda n: [K.gemma_rmsnorm_residual_scalar(x1[:n], w[0], r[:n], s)],
        "dual": lambda n: [K.gemma_dual_rmsnorm_residual_scalar(x1[:n], w[0], x2[:n], w[1], w[2], r[:n], s)],
        "dual_next": lambda n: list(K.gemma_dual_rmsnorm_residual_scalar_next_norm(x1[:n], w[0], x2[:n], w[1], w[2],
                                                                                   r[:n], s, w[3])),
        "post_attention": lambda n: list(K.gemma_post_attention_block(x1[:n], r[:n], *w))}
    for name, call in calls.items():
        long = call(n_long)
        for n in (1, 93, 189, C.SHORT_LAUNCH_BLOCKS_PER_SM * C.num_sms(dev)):  # short launches
            for a, b in zip(call(n), long):
                assert torch.equal(a, b[:n]), f"{name}: rows 0..{n} of a short launch differ from a long one's"
