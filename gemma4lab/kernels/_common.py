"""Shared plumbing for the fused kernels: op registration and backend dispatch, cheap input checks, the row-norm
family's launch settings and the ``@triton.jit`` helpers of the row-norm kernels.

Every kernel is a PyTorch op in the ``gemma4lab`` namespace (:func:`register`): ``torch.ops.gemma4lab.<name>``
runs the compiled Triton kernel on CUDA tensors, and on CPU tensors the same Triton kernel under Triton's
interpreter (when ``TRITON_INTERPRET=1`` was set before import) or the plain-torch reference. Outputs are
preallocated arguments the op writes (declared mutations), so the ops trace under ``torch.compile(fullgraph=True)``
(their fake implementation only has to say "no new tensors") and replay inside CUDA graphs; profilers name them
``gemma4lab::<name>``.

Row-norm layout (rms+residual+scalar, dual epilogue, dual + next norm, post-attention block): a *persistent* grid
of ``min(row blocks, programs_per_sm * SMs)`` programs; each loads its weights (and the scalar) once, then loops
``for blk in tl.range(pid, n_blocks, num_programs, num_stages=STAGES)`` over blocks of ``ROWS`` rows (1 at
H >= 2048) held as one masked ``[ROWS, BLOCK = next_pow2(H)]`` tile; the software pipeliner prefetches the next
rows while the current one is reduced and stored. All math is fp32 and every output is rounded exactly once at
its store. The compile-time layout (BLOCK, ROWS, warps, stages) depends only on (hidden, dtype), never on the
number of rows, so a row's bits do not depend on how many rows share the call.
"""

import dataclasses
from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def empty_kernel(x_ptr):  # tells how @triton.jit decorates in this process; measure.py times its launch
    pass


#: True when ``@triton.jit`` produced interpreter functions, i.e. ``TRITON_INTERPRET=1`` was set before import.
INTERPRET: bool = type(empty_kernel).__name__ == "InterpretedFunction"

#: The interpreter truncates fp32 -> bf16 (real GPUs round to nearest even); under it we round by hand so that the
#: CPU tests see the same bits the GPU will write. Compiled GPU code never takes this branch.
EMULATE_BF16_RTNE = tl.constexpr(INTERPRET)


# ---- programmatic dependent launch (Hopper and later) ------------------------------------------------------------
#
# A kernel launched with PDL may start while the kernel before it in the stream is still running: its programs get
# resident and then block in ``griddepcontrol.wait`` until that kernel has finished and its writes are visible.
# Each of the package's kernels, when ``PDL`` is on, waits first thing and at once lets the next kernel launch
# (:func:`wait_and_release`), so every transition between two of them overlaps a launch and a prologue with the
# previous kernel's tail. Safe by construction: no kernel loads anything before its wait (even a weight may have
# been written by the kernel just before, e.g. a cast), and a wait returns only once the previous grid has
# completed, which waited for its own predecessor in turn. The one thing done earlier is the dense GEMM's L2
# prefetch of its weight rows (:func:`prefetch_l2`): a hint that fills L2, where any write is already coherent, and
# never a register.

_DEPENDENT_LAUNCH = [False]


class dependent_launch:  # noqa: N801 - used as a context manager, like torch.no_grad
    """``with dependent_launch():`` launches the package's kernels on CUDA devices of compute capability >= 9 with
    programmatic dependent launch (captured into CUDA graphs as programmatic edges); off by default.
    ``dependent_launch(False)`` turns it off inside an enabled block."""

    def __init__(self, enabled: bool = True) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"dependent_launch takes a bool, got {enabled!r}")
        self.enabled, self._saved = enabled, []

    def __enter__(self) -> "dependent_launch":
        self._saved.append(_DEPENDENT_LAUNCH[0])
        _DEPENDENT_LAUNCH[0] = self.enabled
        return self

    def __exit__(self, *exc: object) -> None:
        _DEPENDENT_LAUNCH[0] = self._saved.pop()


@cache
def dependent_launch_supported(device: torch.device) -> bool:
    """Compiled Triton on a CUDA device of compute capability >= 9 (Hopper): where :class:`dependent_launch` acts."""
    device = torch.device(device)
    return not INTERPRET and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def dependent_launch_setting(requested: bool | None, device: torch.device) -> bool:
    """A graph runner's ``dependent_launch`` argument resolved: as given, or (None) wherever ``device`` supports it."""
    return dependent_launch_supported(device) if requested is None else requested


def pdl_meta(t: torch.Tensor) -> dict:
    """Launch arguments for a kernel taking a ``PDL`` constexpr: on when :class:`dependent_launch` is active and
    ``t`` is on a CUDA device that supports it (Triton then sets the launch attribute too)."""
    if not (_DEPENDENT_LAUNCH[0] and t.is_cuda and dependent_launch_supported(t.device)):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}


@triton.jit
def wait_and_release(PDL: tl.constexpr):
    """With ``PDL``: block until the previous kernel's writes are visible, then let the next kernel launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the 128-byte lines at ``ptrs`` (no registers, no wait): a weight stream started before
    :func:`wait_and_release` returns."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [ptrs], dtype=tl.int32, is_pure=False,
                              pack=1)


def kernel_backend(t: torch.Tensor) -> str:
    """Which implementation a call with activations ``t`` runs: ``"triton"`` (CUDA), ``"triton-interpreter"``
    (``TRITON_INTERPRET=1`` set before import; CPU or CUDA tensors) or ``"torch-reference"`` (anything else)."""
    if t.is_cuda:
        return "triton-interpreter" if INTERPRET else "triton"
    if INTERPRET and t.device.type == "cpu":
        return "triton-interpreter"
    return "torch-reference"


def host_values(t: torch.Tensor) -> bool:
    """True when ``t``'s values can be checked for free: on the host, and not while torch.compile traces (its
    tensors are then fake)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


# ---- registration as PyTorch ops -----------------------------------------------------------------------------
_LIB = torch.library.Library("gemma4lab", "DEF")


def register(schema: str, triton_impl, torch_impl):
    """Define ``gemma4lab::<schema>`` and return its overload: ``triton_impl`` for CUDA (and for the CPU under the
    interpreter), ``torch_impl`` (the reference) for the CPU otherwise. Ops return nothing and write their
    preallocated outputs (``Tensor(a!)`` in the schema), so their fake implementation is a no-op."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, triton_impl, "CUDA")
    _LIB.impl(name, triton_impl if INTERPRET else torch_impl, "CPU")
    torch.library.register_fake(f"gemma4lab::{name}", _no_new_tensors, lib=_LIB)
    return getattr(torch.ops.gemma4lab, name).default


def _no_new_tensors(*args, **kwargs) -> None:
    return None


def pow2(config: object, *names: str) -> None:
    """Launch settings must be powers of two (block shapes, warps): a clear error instead of a Triton failure."""
    for name in names:
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v & (v - 1):
            raise ValueError(f"{type(config).__name__}.{name} must be a power of two >= 1, got {v!r}")


# ---- launch configuration -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowConfig:
    """Launch of the persistent row-norm kernels (the row family: rms + residual + scalar, the dual epilogue with and
    without the next norm, the post-attention block): a grid of ``min(row blocks, programs_per_sm * SMs)`` programs,
    ``num_warps`` warps each, looping over blocks of ``rows`` rows (a power of two; 1 at H >= 2048) with a
    ``num_stages``-deep software pipeline. Pass one as ``config=`` to override :func:`row_config` (``--sweep`` does).
    Only the grid size depends on the number of rows, so a row's result never depends on it."""

    programs_per_sm: int = 2
    num_warps: int = 4
    num_stages: int = 3
    rows: int = 1

    def __post_init__(self) -> None:
        pow2(self, "num_warps", "rows")
        if self.programs_per_sm < 1 or self.num_stages < 1:
            raise ValueError(f"RowConfig.programs_per_sm and num_stages must be >= 1, got {self}")


_SMS: dict = {}


def num_sms(device: torch.device | None) -> int:
    """Streaming multiprocessors of ``device`` (cached per device, no sync); 132 (H100/H200) when None; 1 on CPU so
    the interpreter runs few programs (faster CPU tests, and every program loops over several rows)."""
    n = _SMS.get(device)
    if n is None:
        if device is None:
            n = 132
        elif device.type != "cuda":
            n = 1
        else:
            n = torch.cuda.get_device_properties(
                device.index if device.index is not None else torch.cuda.current_device()).multi_processor_count
        _SMS[device] = n
    return n


#: Shared memory a program may spend on its pipeline's prefetched rows (two programs per SM fit on H100/H200).
_STAGE_SMEM = 96 * 1024


@cache
def row_config(hidden: int, dtype: torch.dtype = torch.bfloat16, streams: int = 3) -> RowConfig:
    """Heuristic for a row kernel reading ``streams`` activation rows per token. Tile = rows * next_pow2(hidden):
    one row when that is >= 2048 elements, else rows packed up to a 2048-element tile (at most 16). 4 warps up to a
    4096-element tile (the H200 optimum at hidden 2816), more beyond; 3 pipeline stages unless the prefetched rows
    would exceed ~96 KB of shared memory (e.g. fp32 at hidden 2816 -> 2 stages); 2 programs per SM."""
    block = triton.next_power_of_2(hidden)
    rows = max(1, min(16, 2048 // block))
    tile = rows * block
    warps = min(4, max(1, tile // 512)) if tile <= 4096 else min(16, tile // 1024)
    per_stage = streams * tile * (4 if dtype == torch.float32 else 2)
    stages = max(1, min(3, _STAGE_SMEM // per_stage))
    return RowConfig(programs_per_sm=2, num_warps=warps, num_stages=stages, rows=rows)


@cache
def _row_meta(hidden: int, dtype: torch.dtype, streams: int, cfg: RowConfig) -> dict:
    return dict(H=hidden, BLOCK=triton.next_power_of_2(hidden), ROWS=cfg.rows, STAGES=cfg.num_stages,
                num_warps=cfg.num_warps)


_LAUNCH: dict = {}  # (hidden, dtype, streams, device) -> the heuristic's two launches (see row_launch)

#: Up to this many row blocks per SM a launch is *short*: 4 programs per SM, at most 4 blocks each, no software
#: pipeline. Measured on an H200 (``experiments/row_kernels_small_t.py``, ``results/runs/row_small_t_h200.json``,
#: bf16, hidden 2816, in CUDA graphs): a 3-stage pipeline stages a lone row's loads through shared memory for
#: nothing — at 189 rows 2.57 µs unpipelined against 2.87, the dual epilogue 3.15 against 4.03; at 1453 rows (2.75
#: blocks per program) 5.39 against 6.46 and 9.50 against 10.30; from ~10 000 rows the pipeline wins again (48.8
#: against 54.9 µs at 11 533). Stages and grid change the load path and the row-to-program map only, never a
#: row's arithmetic, so every launch gives the same bits (the run checked it).
SHORT_LAUNCH_BLOCKS_PER_SM = 16


def row_launch(n_rows: int, hidden: int, dtype: torch.dtype, device: torch.device, streams: int,
               config: RowConfig | None = None) -> tuple[tuple[int], dict]:
    """Grid and compile-time arguments of a persistent row kernel (one dict lookup on the heuristic path): the
    heuristic's layout, pipelined for long launches and unpipelined with more programs for short ones
    (:data:`SHORT_LAUNCH_BLOCKS_PER_SM`); a ``config`` is taken as given."""
    if config is None:
        hit = _LAUNCH.get((hidden, dtype, streams, device))
        if hit is None:
            cfg = row_config(hidden, dtype, streams)
            if INTERPRET:  # the CPU interpreter pays per program and per loop step, not per element: tall tiles
                cfg = dataclasses.replace(cfg, rows=max(cfg.rows, min(256, 16384 // triton.next_power_of_2(hidden))))
            sms = num_sms(device)
            short = dataclasses.replace(cfg, programs_per_sm=4, num_stages=1)
            hit = (cfg.rows, cfg.programs_per_sm * sms, _row_meta(hidden, dtype, streams, cfg),
                   SHORT_LAUNCH_BLOCKS_PER_SM * sms, short.programs_per_sm * sms,
                   _row_meta(hidden, dtype, streams, short))
            _LAUNCH[(hidden, dtype, streams, device)] = hit
        rows, cap, meta, short_blocks, short_cap, short_meta = hit
        blocks = -(-n_rows // rows)
        if blocks <= short_blocks:
            return (min(blocks, short_cap),), short_meta
        return (min(blocks, cap),), meta
    if not isinstance(config, RowConfig):
        raise TypeError(f"config must be a RowConfig, got {type(config).__name__}")
    return ((min(-(-n_rows // config.rows), config.programs_per_sm * num_sms(device)),),
            _row_meta(hidden, dtype, streams, config))


# ---- input checks (metadata only: no host sync, safe inside CUDA-graph capture) -----------------------------
def _tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_rows(name: str, t: object, *, hidden: int | None = None, dtype: torch.dtype | None = None,
               device: torch.device | None = None) -> torch.Tensor:
    """A 2-D ``[tokens, hidden]`` activation whose rows are addressable with one row stride (last dim stride 1)."""
    t = _tensor(name, t)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [tokens, hidden], got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has unsupported dtype {t.dtype}; expected one of float32, float16, bfloat16")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the other activations are {dtype}; mixed dtypes are not "
                        "supported")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if hidden is not None and t.shape[1] != hidden:
        raise ValueError(f"{name} has hidden size {t.shape[1]}, expected {hidden}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    return t


def check_same_tokens(name: str, t: torch.Tensor, n_tokens: int) -> None:
    if t.shape[0] != n_tokens:
        raise ValueError(f"{name} has {t.shape[0]} tokens, expected {n_tokens}")


def check_out(name: str, t: object, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer: exact shape/dtype/device, contiguous last dim, rows that do not overlap."""
    t = _tensor(name, t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {device}")
    if t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    if t.dim() == 2 and t.shape[0] > 1 and t.stride(0) < t.shape[1]:
        raise ValueError(f"{name} has overlapping rows (row stride {t.stride(0)} < width {t.shape[1]})")
    return t


def check_vector(name: str, t: object, n: int, act_dtype: torch.dtype, device: torch.device,
                 what: str = "hidden size") -> torch.Tensor:
    """A 1-D weight of length ``n`` in float32 or the activation dtype (the kernels upcast it to fp32 either way;
    the real model keeps weights in the activation dtype)."""
    t = _tensor(name, t)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [{n}], got shape {tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} elements, expected {n} ({what})")
    if t.dtype not in (torch.float32, act_dtype):
        raise TypeError(f"{name} has dtype {t.dtype}; weights must be float32 or the activation dtype {act_dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the activations are on {device}")
    if n > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride()}")
    return t


def check_scalar(name: str, t: object, device: torch.device) -> torch.Tensor:
    """A one-element float *device* tensor, read inside the kernel so CUDA graphs stay valid when it changes."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a one-element tensor on the activations' device (not a Python "
                        f"{type(t).__name__}), so a captured CUDA graph sees updates")
    if t.numel() != 1:
        raise ValueError(f"{name} must have exactly one element, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has unsupported dtype {t.dtype}; expected float32, float16 or bfloat16")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the activations are on {device}")
    return t


def rows_ok(acts: tuple, vectors: tuple, scalar: object, outs: tuple) -> bool:
    """Happy-path check of a row kernel's inputs in one pass (~0.5 us per tensor): ``[tokens, hidden]``
    activations of one supported dtype and device with unit column stride, 1-D contiguous ``[hidden]`` weights in
    fp32 or that dtype, a one-element float scalar (``None``: no scalar), output buffers (``None``: allocate) of the
    same shape with non-overlapping rows. False means "let :func:`check_row_call` explain": it never raises."""
    try:
        x = acts[0]
        shape, dt, dev = x.shape, x.dtype, x.device
        if len(shape) != 2 or dt not in SUPPORTED_DTYPES:
            return False
        for t in acts:
            if t.shape != shape or t.dtype is not dt or t.device != dev or t.stride()[1] != 1:
                return False
        n, h = shape
        for w in vectors:
            if w.shape != (h,) or (w.dtype is not dt and w.dtype is not torch.float32) or w.device != dev or \
                    w.stride() != (1,):
                return False
        if scalar is not None and (scalar.numel() != 1 or scalar.dtype not in SUPPORTED_DTYPES
                                   or scalar.device != dev):
            return False
        for o in outs:
            if o is not None:
                st = o.stride()
                if o.shape != shape or o.dtype is not dt or o.device != dev or st[1] != 1 or (st[0] < h and n > 1):
                    return False
        return isinstance(x, torch.Tensor)
    except (AttributeError, TypeError, IndexError, ValueError):
        return False


def check_row_call(acts: tuple, act_names: tuple, vectors: tuple, vec_names: tuple, scalar: object, outs: tuple,
                   out_names: tuple) -> None:
    """Validate a row kernel's call: :func:`rows_ok` on the happy path, else the detailed checks, which raise a
    ``TypeError``/``ValueError`` naming the offending argument (the first activation sets tokens, hidden, dtype and
    device). ``scalar`` None = the kernel has none; ``None`` entries of ``outs`` are buffers to allocate."""
    if rows_ok(acts, vectors, scalar, outs):
        return
    x = check_rows(act_names[0], acts[0])
    n, h = x.shape
    dt, dev = x.dtype, x.device
    for name, t in zip(act_names[1:], acts[1:]):
        check_rows(name, t, hidden=h, dtype=dt, device=dev)
        check_same_tokens(name, t, n)
    for name, w in zip(vec_names, vectors):
        check_vector(name, w, h, dt, dev)
    if scalar is not None:
        check_scalar("scalar", scalar, dev)
    for name, o in zip(out_names, outs):
        if o is not None:
            check_out(name, o, (n, h), dt, dev)


def out_tuple(name: str, out: object, n: int) -> tuple:
    if out is None:
        return (None,) * n
    if not isinstance(out, (tuple, list)) or len(out) != n:
        raise TypeError(f"{name} must be a tuple of {n} tensors or None")
    return tuple(out)


def empty_rows(like: torch.Tensor, n_rows: int, width: int) -> torch.Tensor:
    return torch.empty((n_rows, width), dtype=like.dtype, device=like.device)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Reference math dtype: fp32, or fp64 when fed fp64 (the tests use that as an oracle)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rms_inv_ref(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``(mean(x^2) + eps)^-0.5`` over the last dim, in x's (fp32/fp64) dtype."""
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# ---- @triton.jit helpers ------------------------------------------------------------------------------------
@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """The one rounding of a kernel: fp32 -> ``dtype`` (round to nearest even, also under the interpreter)."""
    if EMULATE_BF16_RTNE:
        if dtype == tl.bfloat16:
            u = x.to(tl.uint32, bitcast=True)
            u = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) << 16
            x = u.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def to_e4m3(x):
    """fp32 ``x`` (within ±448) → ``float8e4nv``, round to nearest even. Triton 3.6's interpreter rounds wrongly
    where a value rounds up into the next power of two (127.5 → 64), so under it the rounding is done by hand in
    fp32 and the (then exact) conversion only stores it; compiled GPU code converts in hardware."""
    if EMULATE_BF16_RTNE:  # the interpreter (the same flag as bf16's emulated rounding)
        ax = tl.abs(x)
        ulp = tl.exp2(tl.maximum(tl.floor(tl.log2(tl.maximum(ax, 1e-30))), -6.0) - 3.0)  # 3 mantissa bits
        y = ax / ulp
        f = tl.floor(y)
        up = (y - f > 0.5) | ((y - f == 0.5) & (f - 2.0 * tl.floor(f * 0.5) == 1.0))  # ties to even
        r = tl.minimum(tl.where(up, f + 1.0, f) * ulp, 448.0)
        x = tl.where(x < 0, -r, r)
    return x.to(tl.float8e4nv)


@triton.jit
def round_trip(x, dtype: tl.constexpr):
    """Round fp32 ``x`` to ``dtype`` and back: the value a later kernel would read from memory."""
    return to_dtype(x, dtype).to(tl.float32)


@triton.jit
def tile_offsets(blk, n_rows, H: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """Rows (int64) and mask of row block ``blk``: a ``[ROWS, BLOCK]`` tile (ROWS = 1: one row per iteration)."""
    rows = blk * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < H)[None, :]
    return rows.to(tl.int64), cols, mask


@triton.jit
def load_tile(ptr, rows, stride, cols, mask, H: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """fp32 ``[ROWS, BLOCK]`` tile; masked lanes read 0 (no mask at all when the tile is exactly the rows)."""
    ptrs = ptr + rows[:, None] * stride + cols[None, :]
    if BLOCK == H and ROWS == 1:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=mask, other=0.0)
    return x.to(tl.float32)


@triton.jit
def store_tile(ptr, rows, stride, cols, mask, x, H: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """Round fp32 ``x`` once to the buffer's dtype and store it."""
    ptrs = ptr + rows[:, None] * stride + cols[None, :]
    y = to_dtype(x, ptr.dtype.element_ty)
    if BLOCK == H and ROWS == 1:
        tl.store(ptrs, y)
    else:
        tl.store(ptrs, y, mask=mask)


@triton.jit
def load_weight(ptr, H: tl.constexpr, BLOCK: tl.constexpr):
    """fp32 ``[1, BLOCK]`` weight row (padding lanes 0), loaded once per program."""
    cols = tl.arange(0, BLOCK)
    if BLOCK == H:
        w = tl.load(ptr + cols)
    else:
        w = tl.load(ptr + cols, mask=cols < H, other=0.0)
    return w.to(tl.float32)[None, :]


@triton.jit
def rms_inv(x, eps, H: tl.constexpr):
    """Per-row ``(mean(x^2) + eps)^-0.5`` of an fp32 tile as a ``[ROWS, 1]`` column (padding lanes are 0)."""
    return tl.rsqrt(tl.sum(x * x, axis=1) / H + eps)[:, None]
