"""Per-head q/k/v norms and RoPE, in place, in one launch:

    q <- rope(rms(q) * q_weight)     k <- rope(rms(k) * k_weight)     v <- rms(v)   (no weight, no rope)

RoPE is the neox / ``rotate_half`` form over the whole head: ``x * cos + rotate_half(x) * sin`` with
``rotate_half(x) = cat(-x[D/2:], x[:D/2])``; or (``axial=True``, the vision tower's 2-D RoPE) the same within each
half of the head, the first half rotating with the patch column and the second with its row. ``cos``/``sin`` are
per-token ``[T, D]`` tables (already gathered by position), which covers default RoPE and Gemma's "proportional"
RoPE (cos = 1, sin = 0 on the unrotated dims).

Numerics: fp32 from load to store, one rounding. Hugging Face rounds q_norm's output to the activation dtype before
RoPE and multiplies by cos/sin cast to that dtype, so in bf16 the two differ by those extra roundings only.

Grid: one program per (head, block of tokens), heads fastest, so all heads of a token block run together and the
cos/sin rows they share are read from DRAM once (then L2). Bytes per token, ``b``-byte activations: read and write
q, k, v ((Hq + 2 Hkv) * D * 2b) plus cos/sin (2 * D * 4). Sliding layer in bf16 (16/8/8 heads of 256): 34.8 KB.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    check_rows,
    check_same_tokens,
    check_vector,
    compute_dtype,
    pdl_meta,
    pow2,
    register,
    to_dtype,
    wait_and_release,
)


@triton.jit
def _rope_pair(a, b, c_ptrs, s_ptrs, off, P: tl.constexpr, mask):
    """``rotate_half`` RoPE of one segment held as its two halves ``a`` | ``b`` (cos/sin columns ``off`` onward)."""
    c_a = tl.load(c_ptrs + off, mask=mask, other=0.0).to(tl.float32)
    c_b = tl.load(c_ptrs + off + P, mask=mask, other=0.0).to(tl.float32)
    s_a = tl.load(s_ptrs + off, mask=mask, other=0.0).to(tl.float32)
    s_b = tl.load(s_ptrs + off + P, mask=mask, other=0.0).to(tl.float32)
    return a * c_a - b * s_a, b * c_b + a * s_b


@triton.jit
def _head(x_ptr, x_off, w_ptr, c_ptr, s_ptr, c_off, s_off, row_mask, eps, D: tl.constexpr, P: tl.constexpr,
          PART: tl.constexpr, AXIAL: tl.constexpr, HAS_W: tl.constexpr, ROPE: tl.constexpr):
    """Normalise (and rotate) one head of ROWS tokens in place. The head is held as its ``P``-wide parts (padded to
    ``PART``) so that rotate_half is plain arithmetic between register tiles: two halves, or with ``AXIAL`` (2-D
    RoPE: each half of the head is a segment of its own, rotating with one image axis) four quarters."""
    cols = tl.arange(0, PART)
    if PART == P:
        mask = row_mask[:, None]
    else:
        mask = row_mask[:, None] & (cols < P)[None, :]
    ptrs = x_ptr + x_off[:, None] + cols[None, :]
    a = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(ptrs + P, mask=mask, other=0.0).to(tl.float32)
    ss = tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)
    if AXIAL:
        c = tl.load(ptrs + 2 * P, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(ptrs + 3 * P, mask=mask, other=0.0).to(tl.float32)
        ss += tl.sum(c * c, axis=1) + tl.sum(d * d, axis=1)
    inv = tl.rsqrt(ss / D + eps)[:, None]
    a = a * inv
    b = b * inv
    if AXIAL:
        c = c * inv
        d = d * inv
    if HAS_W:
        wmask = cols < P
        a = a * tl.load(w_ptr + cols, mask=wmask, other=0.0).to(tl.float32)[None, :]
        b = b * tl.load(w_ptr + P + cols, mask=wmask, other=0.0).to(tl.float32)[None, :]
        if AXIAL:
            c = c * tl.load(w_ptr + 2 * P + cols, mask=wmask, other=0.0).to(tl.float32)[None, :]
            d = d * tl.load(w_ptr + 3 * P + cols, mask=wmask, other=0.0).to(tl.float32)[None, :]
    if ROPE:
        c_ptrs = c_ptr + c_off[:, None] + cols[None, :]
        s_ptrs = s_ptr + s_off[:, None] + cols[None, :]
        a, b = _rope_pair(a, b, c_ptrs, s_ptrs, 0, P, mask)
        if AXIAL:
            c, d = _rope_pair(c, d, c_ptrs, s_ptrs, 2 * P, P, mask)
    dt = x_ptr.dtype.element_ty
    tl.store(ptrs, to_dtype(a, dt), mask=mask)
    tl.store(ptrs + P, to_dtype(b, dt), mask=mask)
    if AXIAL:
        tl.store(ptrs + 2 * P, to_dtype(c, dt), mask=mask)
        tl.store(ptrs + 3 * P, to_dtype(d, dt), mask=mask)


@triton.jit
def _qkv_norm_rope_kernel(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, c_ptr, s_ptr, n_rows, n_q, n_k, n_v,
                          stride_q, stride_k, stride_v, stride_c, stride_s, eps, D: tl.constexpr,
                          P: tl.constexpr, PART: tl.constexpr, AXIAL: tl.constexpr, ROWS: tl.constexpr,
                          PDL: tl.constexpr):
    wait_and_release(PDL)
    pid = tl.program_id(0)
    n_heads = n_q + n_k + n_v
    head = pid % n_heads  # heads fastest: a token block's cos/sin rows stay hot in L2 across its heads
    rows = (pid // n_heads) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    rows = rows.to(tl.int64)
    c_off = rows * stride_c
    s_off = rows * stride_s
    if head < n_q:
        _head(q_ptr + head * D, rows * stride_q, qw_ptr, c_ptr, s_ptr, c_off, s_off, row_mask, eps, D, P, PART,
              AXIAL, True, True)
    elif head < n_q + n_k:
        _head(k_ptr + (head - n_q) * D, rows * stride_k, kw_ptr, c_ptr, s_ptr, c_off, s_off, row_mask, eps, D, P,
              PART, AXIAL, True, True)
    else:
        _head(v_ptr + (head - n_q - n_k) * D, rows * stride_v, qw_ptr, c_ptr, s_ptr, c_off, s_off, row_mask, eps, D,
              P, PART, AXIAL, False, False)


@dataclass(frozen=True)
class HeadConfig:
    """Launch of the per-head kernel: ``rows`` tokens × one head per program, ``num_warps`` warps."""

    rows: int
    num_warps: int

    def __post_init__(self) -> None:
        pow2(self, "rows", "num_warps")


def head_config(n_rows: int, head_dim: int) -> HeadConfig:
    """Tile = ``rows`` tokens x one head: ~2048 elements (8 tokens of D = 256, 4 of D = 512) and 4 warps, i.e. 16
    elements = two 16-byte bf16 vectors per thread per half; fewer tokens per program at small T (the head axis
    already gives Hq + Hk + Hv programs per token block). Every row is computed the same way whatever ``rows`` is."""
    fit = max(1, 2048 // head_dim)
    if INTERPRET:  # the CPU interpreter pays per program, not per element: fewer, taller tiles
        fit = 1024
    rows = min(1 << (fit.bit_length() - 1), triton.next_power_of_2(max(n_rows, 1)))  # powers of two (D = 72: 16)
    return HeadConfig(rows=rows, num_warps=4 if rows * head_dim >= 1024 else 2)


def _heads(name: str, t: torch.Tensor, head_dim: int) -> int:
    if t.shape[1] % head_dim:
        raise ValueError(f"{name} width {t.shape[1]} is not a multiple of head_dim {head_dim}")
    return t.shape[1] // head_dim


def _launch(q, k, v, q_weight, k_weight, cos, sin, eps: float, config: HeadConfig | None, axial: bool = False) -> None:
    n, d = q.shape[0], q_weight.shape[0]
    n_q = q.shape[1] // d
    n_k = k.shape[1] // d if k is not None else 0
    n_v = v.shape[1] // d if v is not None else 0
    cfg = config or head_config(n, d)
    k_, v_, kw = (k if k is not None else q), (v if v is not None else q), (k_weight if k is not None else q_weight)
    grid = ((n_q + n_k + n_v) * triton.cdiv(n, cfg.rows),)
    _qkv_norm_rope_kernel[grid](q, k_, v_, q_weight, kw, cos, sin, n, n_q, n_k, n_v, q.stride(0), k_.stride(0),
                                v_.stride(0), cos.stride(0), sin.stride(0), eps, D=d, P=d // (4 if axial else 2),
                                PART=triton.next_power_of_2(d // (4 if axial else 2)), AXIAL=axial, ROWS=cfg.rows,
                                num_warps=cfg.num_warps, **pdl_meta(q))


def _triton(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, q_weight: torch.Tensor,
            k_weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float,
            axial: bool = False) -> None:  # the dispatcher drops trailing arguments equal to their defaults
    _launch(q, k, v, q_weight, k_weight, cos, sin, eps, None, axial)


def _torch(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, q_weight: torch.Tensor,
           k_weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float,
           axial: bool = False) -> None:
    gemma_qkv_norm_rope_ref_(q, k, v, q_weight, k_weight, cos, sin, eps, axial=axial)


op = register("qkv_norm_rope_(Tensor(a!) q, Tensor(b!)? k, Tensor(c!)? v, Tensor q_weight, Tensor? k_weight, "
              "Tensor cos, Tensor sin, float eps, bool axial=False) -> ()", _triton, _torch)


def gemma_qkv_norm_rope_(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, q_weight: torch.Tensor,
                         k_weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6, *,
                         axial: bool = False, config: HeadConfig | None = None) -> None:
    """In place on 2-D ``[T, heads * head_dim]`` row views (e.g. column slices of a fused qkv buffer: any row
    stride, contiguous last dim). ``head_dim`` is ``q_weight.numel()``; ``cos``/``sin`` are ``[T, head_dim]``
    (float32 or the activation dtype). ``k`` and/or ``v`` may be None (``k_weight`` is then ignored/optional).
    ``axial``: the vision tower's 2-D RoPE, ``rotate_half`` within each half of the head separately (cos/sin laid
    out ``[x, x, y, y]``: the first half rotates with the patch column, the second with its row)."""
    if not isinstance(axial, bool):
        raise TypeError(f"axial must be a bool, got {axial!r}")
    q = check_rows("q", q)
    n = q.shape[0]
    dev, dt = q.device, q.dtype
    if not isinstance(q_weight, torch.Tensor):
        raise TypeError(f"q_weight must be a torch.Tensor, got {type(q_weight).__name__}")
    if q_weight.dim() != 1:
        raise ValueError(f"q_weight must be 1-D [head_dim], got shape {tuple(q_weight.shape)}")
    d = q_weight.shape[0]
    if d < 2 or d % 2 or axial and d % 4:
        raise ValueError(f"head_dim (q_weight.numel()) must be even and >= 2 (a multiple of 4 with axial=True), "
                         f"got {d}")
    check_vector("q_weight", q_weight, d, dt, dev, what="head_dim")
    _heads("q", q, d)
    if k is not None:
        check_rows("k", k, dtype=dt, device=dev)
        check_same_tokens("k", k, n)
        _heads("k", k, d)
        if k_weight is None:
            raise ValueError("k_weight is required when k is given")
        check_vector("k_weight", k_weight, d, dt, dev, what="head_dim")
    else:
        k_weight = None
    if v is not None:
        check_rows("v", v, dtype=dt, device=dev)
        check_same_tokens("v", v, n)
        _heads("v", v, d)
    for name, t in (("cos", cos), ("sin", sin)):
        check_rows(name, t, device=dev)
        if tuple(t.shape) != (n, d):
            raise ValueError(f"{name} must have shape [tokens, head_dim] = {(n, d)}, got {tuple(t.shape)}")
        if t.dtype not in (torch.float32, dt):
            raise TypeError(f"{name} has dtype {t.dtype}; expected float32 or the activation dtype {dt}")
    if n == 0:
        return
    if config is not None:
        _launch(q, k, v, q_weight, k_weight, cos, sin, eps, config, axial)
    else:
        op(q, k, v, q_weight, k_weight, cos, sin, eps, axial)


def _rotate_half(y: torch.Tensor) -> torch.Tensor:
    half = y.shape[-1] // 2
    return torch.cat((-y[..., half:], y[..., :half]), dim=-1)


def _norm_rope_ref(x: torch.Tensor, w: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
                   eps: float, axial: bool = False) -> torch.Tensor:
    """fp32 (fp64) math on a [T, heads, D] view; returns the rounded result."""
    ct = compute_dtype(x)
    y = x.to(ct)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * w.to(ct)
    if cos is not None:
        if axial:  # rotate_half within each half of the head
            rot = torch.cat([_rotate_half(part) for part in y.chunk(2, dim=-1)], dim=-1)
        else:
            rot = _rotate_half(y)
        y = y * cos.to(ct)[:, None, :] + rot * sin.to(ct)[:, None, :]
    return y.to(x.dtype)


def gemma_qkv_norm_rope_ref_(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                             q_weight: torch.Tensor, k_weight: torch.Tensor | None, cos: torch.Tensor,
                             sin: torch.Tensor, eps: float = 1e-6, *, axial: bool = False) -> None:
    """Plain-torch twin of the kernel, also in place (fp32 math, fp64 if fed fp64; one rounding)."""
    d = q_weight.shape[0]
    for x, w, rope in ((q, q_weight, True), (k, k_weight, True), (v, None, False)):
        if x is None or x.shape[0] == 0:
            continue
        view = x.unflatten(-1, (-1, d))
        view.copy_(_norm_rope_ref(view, w, cos if rope else None, sin if rope else None, eps, axial))
