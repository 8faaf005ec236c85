"""Routing bookkeeping of the MoE block in one launch: top-k expert ids → per-expert row offsets, the routed slots
sorted by expert, and the inverse permutation. Replaces ``argsort`` (a radix sort of several kernels), the
``scatter_add`` count, the ``cumsum`` and the inverse-permutation scatter.

Slot ``s = t·k + j`` is token ``t``'s ``j``-th choice. One program per expert ``e`` makes two passes over all
``T·k`` ids: the first counts the ids below ``e`` (its first sorted row) and equal to ``e`` (its row count), so
``offsets[e] = #{ids <= e}`` (the inclusive cumulative count ``moe_gemm`` and ``grouped_mm`` take) without any
cross-program scan; the second writes its slots in slot order (a prefix sum of the matches inside each block), so
``sorted_slot`` is exactly ``argsort(ids, stable=True)`` and ``position[sorted_slot[r]] = r``. Every output element
has one writer and no atomics: deterministic, no host sync, graph-safe.

An id outside ``[0, E)`` (only a caller's bug: ``router_topk`` never emits one, NaN logits included) belongs to no
expert: it is never counted, its slot's ``position`` is -1 (``moe_combine`` gives it weight 0) and the tail of
``sorted_slot`` past the valid rows is -1, so nothing is written out of bounds. The wrapper rejects such ids up
front when their values are on the host.

Cost: every program reads the ids twice from L2, ``2·T·k`` ids per program. At 93 tokens that is 1.5 K ids
(6 KB in int32); at 8192 tokens 131 K ids (1 MB of int64 per program, ~10 µs at ~100 GB/s of L2 per SM), still
below the four to eight kernels it replaces.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_out, host_values, out_tuple, pdl_meta, register, wait_and_release
from .moe_gemm import MoeConfig, moe_config


@triton.jit
def _moe_route_kernel(ids_ptr, offs_ptr, slot_ptr, pos_ptr, n_slots, E, EXPERTS: tl.constexpr, BLOCK: tl.constexpr,
                      PDL: tl.constexpr):
    wait_and_release(PDL)
    pid = tl.program_id(0)
    es = pid * EXPERTS + tl.arange(0, EXPERTS)  # this program's experts: one on a GPU, all under the interpreter
    lanes = tl.arange(0, BLOCK)
    # pass 1: valid ids below e (the first sorted row of expert e) and equal to e (its rows)
    before = tl.zeros((EXPERTS,), dtype=tl.int32)
    mine = tl.zeros((EXPERTS,), dtype=tl.int32)
    for s0 in range(0, n_slots, BLOCK):
        ids = tl.load(ids_ptr + s0 + lanes, mask=s0 + lanes < n_slots, other=-1)
        before += tl.sum(((ids[None, :] >= 0) & (ids[None, :] < es[:, None])).to(tl.int32), axis=1)
        mine += tl.sum((ids[None, :] == es[:, None]).to(tl.int32), axis=1)
    end = before + mine
    tl.store(offs_ptr + es, end, mask=es < E)
    # pass 2: expert e's slots in slot order to rows [before, end); expert 0 also marks invalid slots' positions
    row = before
    for s0 in range(0, n_slots, BLOCK):
        slots = s0 + lanes
        live = slots < n_slots
        ids = tl.load(ids_ptr + slots, mask=live, other=-1)
        hit = (ids[None, :] == es[:, None]) & (es < E)[:, None]  # at most one expert of all programs per slot
        dest = row[:, None] + tl.cumsum(hit.to(tl.int32), axis=1) - 1
        tl.store(slot_ptr + dest, tl.broadcast_to(slots[None, :], (EXPERTS, BLOCK)), mask=hit)
        tl.store(pos_ptr + tl.broadcast_to(slots[None, :], (EXPERTS, BLOCK)), dest, mask=hit)
        if pid == 0:
            tl.store(pos_ptr + slots, tl.full((BLOCK,), -1, tl.int32), mask=live & ((ids < 0) | (ids >= E)))
        row += tl.sum(hit.to(tl.int32), axis=1)
    # the rows no valid id filled (none unless ids were out of range): the last expert's program marks them -1
    if pid == (E - 1) // EXPERTS:
        last_end = tl.sum(tl.where(es == E - 1, end, 0), axis=0)
        for r0 in range(last_end, n_slots, BLOCK):
            tl.store(slot_ptr + r0 + lanes, tl.full((BLOCK,), -1, tl.int32), mask=r0 + lanes < n_slots)


def gemma_moe_route_ref(ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch twin (the unfused path's bookkeeping): stable argsort, bincount + cumsum, inverse permutation."""
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    offsets = torch.bincount(flat, minlength=n_experts).cumsum(0).to(torch.int32)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    return offsets, order.to(torch.int32), position.to(torch.int32)


#: Experts per program under the CPU interpreter (``MoeConfig.route_experts``; one on a GPU), which pays per
#: operation and per program: one program ranking every expert at once (``[experts, BLOCK]`` compares) cut a
#: 24-token routing from ~27 ms to a few.
INTERPRET_ROUTE_EXPERTS = 256


def _launch(ids, offsets, sorted_slot, position, config: MoeConfig | None) -> None:
    n_exp = offsets.shape[0]
    cfg = config or moe_config(ids.numel(), n_exp)
    if INTERPRET and config is None:
        cfg = dataclasses.replace(cfg, route_experts=min(triton.next_power_of_2(n_exp), INTERPRET_ROUTE_EXPERTS))
    extra = {"num_warps": cfg.route_warps} if ids.is_cuda else {}
    block = min(cfg.route_block, triton.next_power_of_2(ids.numel()))
    _moe_route_kernel[(triton.cdiv(n_exp, cfg.route_experts),)](ids, offsets, sorted_slot, position, ids.numel(),
                                                                n_exp, EXPERTS=cfg.route_experts, BLOCK=block,
                                                                **extra, **pdl_meta(ids))


def _triton(ids: torch.Tensor, offsets: torch.Tensor, sorted_slot: torch.Tensor, position: torch.Tensor) -> None:
    _launch(ids, offsets, sorted_slot, position, None)


def _torch(ids: torch.Tensor, offsets: torch.Tensor, sorted_slot: torch.Tensor, position: torch.Tensor) -> None:
    for out, ref in zip((offsets, sorted_slot, position), gemma_moe_route_ref(ids, offsets.shape[0])):
        out.copy_(ref)


op = register("moe_route(Tensor ids, Tensor(a!) offsets, Tensor(b!) sorted_slot, Tensor(c!) position) -> ()",
              _triton, _torch)


def gemma_moe_route(ids: torch.Tensor, n_experts: int, *, out: tuple[torch.Tensor, ...] | None = None,
                    config: MoeConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ids [T, k]`` (int32/int64 expert ids, e.g. from ``gemma_router_topk``) → int32 ``(offsets [E],
    sorted_slot [T·k], position [T·k])``: ``offsets[e]`` = rows of experts ``<= e``, ``sorted_slot`` = the slots
    ``t·k + j`` ordered by expert then slot (``argsort(ids.flatten(), stable=True)``), ``position`` its inverse. One
    launch. ``out`` may pass the three buffers; ``config`` overrides the route fields of :func:`moe_config`."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be a 2-D [tokens, top_k] int32/int64 tensor, got {ids.dtype} {tuple(ids.shape)}")
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be a positive int, got {n_experts!r}")
    n = ids.numel()
    if n >= 2**31:
        raise ValueError(f"{n} routed slots do not fit the int32 row indices")
    if host_values(ids) and n:  # values on the host already: check them (no device sync)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= n_experts:
            raise ValueError(f"expert ids must lie in [0, {n_experts}), got values in [{lo}, {hi}]")
    ids = ids.contiguous()
    dev = ids.device
    shapes = ((n_experts,), (n,), (n,))
    outs = tuple(torch.empty(shape, dtype=torch.int32, device=dev) if o is None
                 else check_out(f"out[{i}]", o, shape, torch.int32, dev)
                 for i, (o, shape) in enumerate(zip(out_tuple("out", out, 3), shapes)))
    if any(not o.is_contiguous() for o in outs):
        raise ValueError("moe_route's out buffers must be contiguous")
    if n == 0:
        outs[0].zero_()
    elif config is not None:
        _launch(ids, *outs, config)
    else:
        op(ids, *outs)
    return outs
