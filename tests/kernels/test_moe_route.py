"""``gemma_moe_route``: top-k ids → per-expert offsets, slots sorted by expert, the inverse permutation, in one
launch. The oracle is what the unfused path computes: ``argsort(stable=True)``, ``cumsum(bincount)``."""

from __future__ import annotations

import pytest
import torch
from support import act, oracle_router, wt

import gemma4lab.kernels as K

pytestmark = pytest.mark.usefixtures("triton_path_only")

POISON = -7  # what no output may still hold after the kernel


def oracle(ids: torch.Tensor, n_experts: int):
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel())
    return torch.bincount(flat, minlength=n_experts).cumsum(0), order, position


def poisoned(n_experts: int, n_slots: int, device="cpu"):
    return tuple(torch.full((n,), POISON, dtype=torch.int32, device=device) for n in (n_experts, n_slots, n_slots))


def _assert_route(ids, n_experts, got):
    offs, order, position = oracle(ids.cpu(), n_experts)
    got_offs, got_slot, got_pos = (t.cpu() for t in got)
    assert all(t.dtype == torch.int32 for t in got)
    assert torch.equal(got_offs.long(), offs), "offsets differ from cumsum(bincount)"
    assert torch.equal(got_slot.long(), order), "sorted slots differ from argsort(stable=True)"
    assert torch.equal(got_pos.long(), position), "position is not the inverse permutation"


def _distinct(gen, t, k, e):
    """The router's output: k distinct experts per token."""
    return torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]) if t else torch.empty(0, k).long()


CASES = {
    "real shape, T=93": lambda g: _distinct(g, 93, 8, 128),
    "T=1": lambda g: _distinct(g, 1, 2, 8),
    "odd T": lambda g: _distinct(g, 37, 3, 16),
    "T*k > one block": lambda g: _distinct(g, 700, 2, 8),
    "all to one expert": lambda g: torch.full((19, 1), 5),
    "empty experts": lambda g: torch.randint(0, 2, (41, 2), generator=g) * 6,  # only experts 0 and 6 of 8
    "one expert": lambda g: torch.zeros(9, 3, dtype=torch.int64),
    "int32 ids": lambda g: _distinct(g, 23, 4, 8).int(),
}
N_EXPERTS = {"real shape, T=93": 128, "odd T": 16, "one expert": 1}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_stable_argsort(gen, case):
    ids = CASES[case](gen)
    e = N_EXPERTS.get(case, 8)
    assert K.kernel_backend(ids.float()) == "triton-interpreter"
    _assert_route(ids, e, K.gemma_moe_route(ids, e, out=poisoned(e, ids.numel())))


def test_small_blocks_carry_counts_across_iterations(gen):
    """route_block 16 over 256 slots: every expert's rows span many blocks of the scan."""
    ids = torch.randint(0, 8, (128, 2), generator=gen)
    cfg = K.MoeConfig(route_block=16)
    _assert_route(ids, 8, K.gemma_moe_route(ids, 8, out=poisoned(8, 256), config=cfg))


@pytest.mark.parametrize("experts_per_program", [1, 2, 4])
@pytest.mark.parametrize("case", ["odd T", "empty experts", "T*k > one block"])
def test_the_gpus_one_expert_a_program_layout(gen, case, experts_per_program):
    """Under the interpreter one program ranks every expert; a GPU runs one program per expert. Both layouts (and
    those between) give the same routing, the invalid-slot and tail marking done by the right program."""
    ids = CASES[case](gen)
    e = N_EXPERTS.get(case, 8) - (1 if experts_per_program == 4 else 0)  # 7 or 15 experts: a part-filled program
    ids = torch.where(ids >= e, ids % e, ids)
    cfg = K.MoeConfig(route_experts=experts_per_program)
    _assert_route(ids, e, K.gemma_moe_route(ids, e, out=poisoned(e, ids.numel()), config=cfg))


def test_zero_tokens():
    offs, slot, pos = K.gemma_moe_route(torch.empty(0, 2, dtype=torch.int64), 8)
    assert offs.tolist() == [0] * 8 and slot.numel() == pos.numel() == 0


def test_rejects_out_of_range_ids():
    for bad in (-1, 8):
        ids = torch.tensor([[0, 3], [bad, 2]])
        with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 8\)"):
            K.gemma_moe_route(ids, 8)
    with pytest.raises(ValueError, match="int32/int64"):
        K.gemma_moe_route(torch.zeros(4, 2), 8)
    with pytest.raises(ValueError, match="2-D"):
        K.gemma_moe_route(torch.zeros(8, dtype=torch.int64), 8)
    with pytest.raises(ValueError, match="shape"):
        K.gemma_moe_route(torch.zeros(4, 2, dtype=torch.int64), 8, out=poisoned(8, 7))


@pytest.mark.parametrize("gpu_layout", [False, True])  # the interpreter's setting; one expert a program
def test_out_of_range_ids_never_written_out_of_bounds(gen, gpu_layout):
    """Past the wrapper's host check (the op itself, as a GPU caller would reach it): an invalid id belongs to no
    expert, its position is -1, the sorted tail is -1, and nothing outside the buffers is touched."""
    ids = _distinct(gen, 30, 2, 8)
    ids[3, 1], ids[17, 0], ids[29, 1] = -1, 8, 1 << 40
    valid = ((ids >= 0) & (ids < 8)).reshape(-1)
    n, n_valid = ids.numel(), int(valid.sum())
    guard = 5  # poisoned cells on both sides of every output
    bufs = [torch.full((m + 2 * guard,), POISON, dtype=torch.int32) for m in (8, n, n)]
    if gpu_layout:  # the launch the op makes, with a given setting (the op itself takes none)
        from gemma4lab.kernels.moe_route import _launch

        _launch(ids, *(b[guard:-guard] for b in bufs), K.MoeConfig(route_experts=1))
    else:
        torch.ops.gemma4lab.moe_route(ids, *(b[guard:-guard] for b in bufs))
    for b in bufs:
        assert (b[:guard] == POISON).all() and (b[-guard:] == POISON).all(), "wrote outside its buffer"
    offs, slot, pos = (b[guard:-guard].long() for b in bufs)
    flat = ids.reshape(-1)
    valid_slots = torch.nonzero(valid).reshape(-1)
    assert torch.equal(offs, torch.bincount(flat[valid], minlength=8).cumsum(0))
    assert torch.equal(slot[:n_valid], valid_slots[torch.argsort(flat[valid], stable=True)])
    assert (slot[n_valid:] == -1).all()
    assert (pos[~valid] == -1).all() and torch.equal(slot[pos[valid]], valid_slots)


def test_nan_logits_route_to_valid_experts(gen):
    """A NaN or +inf logit makes the row's softmax all NaN; router_topk still picks k distinct valid ids (as
    torch.topk does, though its order among NaN ties is its own), so the routing stays in bounds and matches the
    sort."""
    logits = act(gen, 12, 8, scale=2.0)
    logits[2, 5] = float("nan")
    logits[7] = float("nan")
    logits[9, 1] = float("inf")
    _, ids = K.gemma_router_topk(logits, wt(gen, 8), 2)
    assert ((ids >= 0) & (ids < 8)).all() and (ids[:, 0] != ids[:, 1]).all()
    finite = torch.tensor([r not in (2, 7, 9) for r in range(12)])
    assert torch.equal(ids[finite], oracle_router(logits[finite].double(), torch.ones(8).double(), 2)[1])
    _assert_route(ids, 8, K.gemma_moe_route(ids, 8, out=poisoned(8, ids.numel())))


def test_reference_twin_matches_oracle(gen):
    ids = _distinct(gen, 37, 3, 16)
    _assert_route(ids, 16, K.gemma_moe_route_ref(ids, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 93, 189, 4099])
def test_gpu_matches_stable_argsort(gen, t):
    ids = _distinct(gen, t, 8, 128).cuda()
    _assert_route(ids, 128, K.gemma_moe_route(ids, 128, out=poisoned(128, ids.numel(), "cuda")))
    skewed = (torch.rand(t, 8, generator=gen) ** 4 * 128).long().cuda()  # hot low-numbered experts, some empty
    _assert_route(skewed, 128, K.gemma_moe_route(skewed, 128, out=poisoned(128, skewed.numel(), "cuda")))
