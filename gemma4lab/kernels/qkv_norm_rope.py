"""Per-head q/k/v norms and RoPE, in place, in one launch:

    q <- rope(rms(q) * q_weight)     k <- rope(rms(k) * k_weight)     v <- rms(v)   (no weight, no rope)

RoPE is the neox / ``rotate_half`` form over the whole head: ``x * cos + rotate_half(x) * sin`` with
``rotate_half(x) = cat(-x[D/2:], x[:D/2])``. ``cos``/``sin`` are per-token ``[T, D]`` tables (already gathered by
position), which covers default RoPE and Gemma's "proportional" RoPE (cos = 1, sin = 0 on the unrotated dims).

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

from ._common import check_rows, check_same_tokens, check_vector, compute_dtype, pow2, register, to_dtype


@triton.jit
def _head(x_ptr, x_off, w_ptr, c_ptr, s_ptr, c_off, s_off, row_mask, eps, D: tl.constexpr, HALF: tl.constexpr,
          HAS_W: tl.constexpr, ROPE: tl.constexpr):
    """Normalise (and rotate) one head of ROWS tokens in place; the head is handled as its two halves so that
    rotate_half is plain arithmetic between two register tiles."""
    cols = tl.arange(0, HALF)
    if HALF * 2 == D:
        mask = row_mask[:, None]
    else:
        mask = row_mask[:, None] & (cols < D // 2)[None, :]
    lo_ptrs = x_ptr + x_off[:, None] + cols[None, :]
    lo = tl.load(lo_ptrs, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(lo_ptrs + D // 2, mask=mask, other=0.0).to(tl.float32)
    inv = tl.rsqrt((tl.sum(lo * lo, axis=1) + tl.sum(hi * hi, axis=1)) / D + eps)[:, None]
    lo = lo * inv
    hi = hi * inv
    if HAS_W:
        wmask = cols < D // 2
        lo = lo * tl.load(w_ptr + cols, mask=wmask, other=0.0).to(tl.float32)[None, :]
        hi = hi * tl.load(w_ptr + D // 2 + cols, mask=wmask, other=0.0).to(tl.float32)[None, :]
    if ROPE:
        c_ptrs = c_ptr + c_off[:, None] + cols[None, :]
        s_ptrs = s_ptr + s_off[:, None] + cols[None, :]
        c_lo = tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
        c_hi = tl.load(c_ptrs + D // 2, mask=mask, other=0.0).to(tl.float32)
        s_lo = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
        s_hi = tl.load(s_ptrs + D // 2, mask=mask, other=0.0).to(tl.float32)
        lo, hi = lo * c_lo - hi * s_lo, hi * c_hi + lo * s_hi
    dt = x_ptr.dtype.element_ty
    tl.store(lo_ptrs, to_dtype(lo, dt), mask=mask)
    tl.store(lo_ptrs + D // 2, to_dtype(hi, dt), mask=mask)


@triton.jit
def _qkv_norm_rope_kernel(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, c_ptr, s_ptr, n_rows, n_q, n_k, n_v,
                          stride_q, stride_k, stride_v, stride_c, stride_s, eps, D: tl.constexpr,
                          HALF: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    n_heads = n_q + n_k + n_v
    head = pid % n_heads  # heads fastest: a token block's cos/sin rows stay hot in L2 across its heads
    rows = (pid // n_heads) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    rows = rows.to(tl.int64)
    c_off = rows * stride_c
    s_off = rows * stride_s
    if head < n_q:
        _head(q_ptr + head * D, rows * stride_q, qw_ptr, c_ptr, s_ptr, c_off, s_off, row_mask, eps, D, HALF,
              True, True)
    elif head < n_q + n_k:
        _head(k_ptr + (head - n_q) * D, rows * stride_k, kw_ptr, c_ptr, s_ptr, c_off, s_off, row_mask, eps, D, HALF,
              True, True)
    else:
        _head(v_ptr + (head - n_q - n_k) * D, rows * stride_v, qw_ptr, c_ptr, s_ptr, c_off, s_off, row_mask, eps, D,
              HALF, False, False)


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
    rows = max(1, min(2048 // head_dim, triton.next_power_of_2(max(n_rows, 1))))
    return HeadConfig(rows=rows, num_warps=4 if rows * head_dim >= 1024 else 2)


def _heads(name: str, t: torch.Tensor, head_dim: int) -> int:
    if t.shape[1] % head_dim:
        raise ValueError(f"{name} width {t.shape[1]} is not a multiple of head_dim {head_dim}")
    return t.shape[1] // head_dim


def _launch(q, k, v, q_weight, k_weight, cos, sin, eps: float, config: HeadConfig | None) -> None:
    n, d = q.shape[0], q_weight.shape[0]
    n_q = q.shape[1] // d
    n_k = k.shape[1] // d if k is not None else 0
    n_v = v.shape[1] // d if v is not None else 0
    cfg = config or head_config(n, d)
    k_, v_, kw = (k if k is not None else q), (v if v is not None else q), (k_weight if k is not None else q_weight)
    grid = ((n_q + n_k + n_v) * triton.cdiv(n, cfg.rows),)
    _qkv_norm_rope_kernel[grid](q, k_, v_, q_weight, kw, cos, sin, n, n_q, n_k, n_v, q.stride(0), k_.stride(0),
                                v_.stride(0), cos.stride(0), sin.stride(0), eps, D=d,
                                HALF=triton.next_power_of_2(d // 2), ROWS=cfg.rows, num_warps=cfg.num_warps)


def _triton(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, q_weight: torch.Tensor,
            k_weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float) -> None:
    _launch(q, k, v, q_weight, k_weight, cos, sin, eps, None)


def _torch(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, q_weight: torch.Tensor,
           k_weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float) -> None:
    gemma_qkv_norm_rope_ref_(q, k, v, q_weight, k_weight, cos, sin, eps)


op = register("qkv_norm_rope_(Tensor(a!) q, Tensor(b!)? k, Tensor(c!)? v, Tensor q_weight, Tensor? k_weight, "
              "Tensor cos, Tensor sin, float eps) -> ()", _triton, _torch)


def gemma_qkv_norm_rope_(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, q_weight: torch.Tensor,
                         k_weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6, *,
                         config: HeadConfig | None = None) -> None:
    """In place on 2-D ``[T, heads * head_dim]`` row views (e.g. column slices of a fused qkv buffer: any row
    stride, contiguous last dim). ``head_dim`` is ``q_weight.numel()``; ``cos``/``sin`` are ``[T, head_dim]``
    (float32 or the activation dtype). ``k`` and/or ``v`` may be None (``k_weight`` is then ignored/optional)."""
    q = check_rows("q", q)
    n = q.shape[0]
    dev, dt = q.device, q.dtype
    if not isinstance(q_weight, torch.Tensor):
        raise TypeError(f"q_weight must be a torch.Tensor, got {type(q_weight).__name__}")
    if q_weight.dim() != 1:
        raise ValueError(f"q_weight must be 1-D [head_dim], got shape {tuple(q_weight.shape)}")
    d = q_weight.shape[0]
    if d < 2 or d % 2:
        raise ValueError(f"head_dim (q_weight.numel()) must be even and >= 2, got {d}")
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
        _launch(q, k, v, q_weight, k_weight, cos, sin, eps, config)
    else:
        op(q, k, v, q_weight, k_weight, cos, sin, eps)


def _norm_rope_ref(x: torch.Tensor, w: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
    """fp32 (fp64) math on a [T, heads, D] view; returns the rounded result."""
    ct = compute_dtype(x)
    y = x.to(ct)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * w.to(ct)
    if cos is not None:
        half = y.shape[-1] // 2
        rot = torch.cat((-y[..., half:], y[..., :half]), dim=-1)
        y = y * cos.to(ct)[:, None, :] + rot * sin.to(ct)[:, None, :]
    return y.to(x.dtype)


def gemma_qkv_norm_rope_ref_(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                             q_weight: torch.Tensor, k_weight: torch.Tensor | None, cos: torch.Tensor,
                             sin: torch.Tensor, eps: float = 1e-6) -> None:
    """Plain-torch twin of the kernel, also in place (fp32 math, fp64 if fed fp64; one rounding)."""
    d = q_weight.shape[0]
    for x, w, rope in ((q, q_weight, True), (k, k_weight, True), (v, None, False)):
        if x is None or x.shape[0] == 0:
            continue
        view = x.unflatten(-1, (-1, d))
        view.copy_(_norm_rope_ref(view, w, cos if rope else None, sin if rope else None, eps))
