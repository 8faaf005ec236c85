"""MoE routing after the router matmul: ``softmax`` over all experts (fp32) -> top-k -> renormalise the k
probabilities to sum 1 -> multiply by ``per_expert_scale[id]``. Matches Hugging Face's ``Gemma4TextRouter``.

Selection order equals ``torch.topk`` (descending probability). Ties (equal fp32 probabilities, e.g. duplicate
bf16 logits) go to the *lowest* expert index first; ``torch.topk`` does not document its tie order, so on exact
ties the ids may be a permutation of torch's (the weights are then equal anyway). NaN is handled as ``torch.topk``
handles it: NaN ranks above every probability, so a row with a NaN or +inf logit (whose softmax is all NaN) gets
``top_k`` distinct, valid expert ids and NaN weights — never an id out of range.

Bytes per token (128 experts, top-8): read logits (128 * b), write weights and ids (8 * 4 + 8 * 8).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import check_out, check_rows, check_vector, out_tuple, pdl_meta, pow2, register, wait_and_release


@triton.jit
def _router_topk_kernel(l_ptr, scale_ptr, w_ptr, id_ptr, n_rows, stride_l, stride_w, stride_id, E: tl.constexpr,
                        E_BLOCK: tl.constexpr, K: tl.constexpr, K_BLOCK: tl.constexpr, ROWS: tl.constexpr,
                        PDL: tl.constexpr):
    wait_and_release(PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    rows = rows.to(tl.int64)
    cols = tl.arange(0, E_BLOCK)
    col_ok = (cols < E)[None, :]
    x = tl.load(l_ptr + rows[:, None] * stride_l + cols[None, :], mask=row_mask[:, None] & col_ok, other=0.0)
    x = tl.where(col_ok, x.to(tl.float32), float("-inf"))
    e = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    p = tl.where(col_ok, p, -1.0)  # padding lanes never win
    key = tl.where(p != p, 2.0, p)  # NaN ranks above every probability (<= 1), as in torch.topk
    kcols = tl.arange(0, K_BLOCK)[None, :]
    top_p = tl.zeros([ROWS, K_BLOCK], dtype=tl.float32)
    top_i = tl.zeros([ROWS, K_BLOCK], dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.max(key, axis=1)
        idx = tl.min(tl.where(key == best[:, None], cols[None, :], E_BLOCK), axis=1)  # lowest index among ties
        hit = cols[None, :] == idx[:, None]
        top_p = tl.where(kcols == j, tl.sum(tl.where(hit, p, 0.0), axis=1)[:, None], top_p)  # p itself (NaN stays)
        top_i = tl.where(kcols == j, idx[:, None], top_i)
        key = tl.where(hit, -2.0, key)
    k_ok = kcols < K
    scale = tl.load(scale_ptr + top_i, mask=k_ok, other=0.0).to(tl.float32)
    w = top_p / tl.sum(top_p, axis=1)[:, None] * scale
    out_mask = row_mask[:, None] & k_ok
    tl.store(w_ptr + rows[:, None] * stride_w + kcols, w, mask=out_mask)
    tl.store(id_ptr + rows[:, None] * stride_id + kcols, top_i.to(id_ptr.dtype.element_ty), mask=out_mask)


@dataclass(frozen=True)
class RouterConfig:
    """Launch of the router kernel: ``rows`` tokens per program (all ``E`` logits of each), ``num_warps`` warps."""

    rows: int
    num_warps: int

    def __post_init__(self) -> None:
        pow2(self, "rows", "num_warps")


def router_config(n_rows: int, n_experts: int) -> RouterConfig:
    """Tiny rows (128 logits): pack ~2048 logits per program (16 tokens at 128 experts), 4 warps; fewer rows when
    there are fewer tokens. Each row's selection is computed the same way whatever ``rows`` is."""
    e_block = triton.next_power_of_2(n_experts)
    rows = max(1, min(2048 // e_block, triton.next_power_of_2(max(n_rows, 1))))
    return RouterConfig(rows=rows, num_warps=4 if rows * e_block >= 2048 else 1)


def _launch(logits, per_expert_scale, top_k: int, weights, ids, config: RouterConfig | None) -> None:
    n, n_exp = logits.shape
    cfg = config or router_config(n, n_exp)
    _router_topk_kernel[(triton.cdiv(n, cfg.rows),)](
        logits, per_expert_scale, weights, ids, n, logits.stride(0), weights.stride(0), ids.stride(0), E=n_exp,
        E_BLOCK=triton.next_power_of_2(n_exp), K=top_k, K_BLOCK=triton.next_power_of_2(top_k), ROWS=cfg.rows,
        num_warps=cfg.num_warps, **pdl_meta(logits))


def _triton(logits: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int, weights: torch.Tensor,
            ids: torch.Tensor) -> None:
    _launch(logits, per_expert_scale, top_k, weights, ids, None)


def _torch(logits: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int, weights: torch.Tensor,
           ids: torch.Tensor) -> None:
    w_ref, id_ref = gemma_router_topk_ref(logits, per_expert_scale, top_k)
    weights.copy_(w_ref)
    ids.copy_(id_ref)


op = register("router_topk(Tensor logits, Tensor per_expert_scale, int top_k, Tensor(a!) weights, Tensor(b!) ids) "
              "-> ()", _triton, _torch)


def gemma_router_topk(logits: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int, *,
                      ids_dtype: torch.dtype = torch.int64, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                      config: RouterConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [T, E]`` (any supported float dtype) -> ``(weights fp32 [T, top_k], ids [T, top_k])``.
    ``per_expert_scale`` is ``[E]`` in float32 or the logits' dtype; ids are ``ids_dtype``: int64 (like
    torch.topk) or int32. ``out=(weights, ids)`` may pass preallocated buffers (their dtypes must be float32 and
    ``ids_dtype``); ``config`` overrides the launch heuristic (tuning)."""
    logits = check_rows("logits", logits)
    n, n_exp = logits.shape
    dev = logits.device
    check_vector("per_expert_scale", per_expert_scale, n_exp, logits.dtype, dev, what="number of experts")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= n_exp:
        raise ValueError(f"top_k={top_k} must be between 1 and the number of experts ({n_exp})")
    if ids_dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids_dtype must be torch.int32 or torch.int64, got {ids_dtype}")
    w_out, id_out = out_tuple("out", out, 2)
    w_out = (torch.empty((n, top_k), dtype=torch.float32, device=dev) if w_out is None
             else check_out("out[0]", w_out, (n, top_k), torch.float32, dev))
    id_out = (torch.empty((n, top_k), dtype=ids_dtype, device=dev) if id_out is None
              else check_out("out[1]", id_out, (n, top_k), ids_dtype, dev))
    if n == 0:
        return w_out, id_out
    if config is not None:
        _launch(logits, per_expert_scale, top_k, w_out, id_out, config)
    else:
        op(logits, per_expert_scale, top_k, w_out, id_out)
    return w_out, id_out


def gemma_router_topk_ref(logits: torch.Tensor, per_expert_scale: torch.Tensor,
                          top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch twin (the Hugging Face router's last four lines); fp64 in gives fp64 weights."""
    ct = torch.float64 if logits.dtype == torch.float64 else torch.float32
    probs = torch.softmax(logits.to(ct), dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return w * per_expert_scale.to(ct)[ids], ids
