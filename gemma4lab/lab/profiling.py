"""How many kernels a forward launches, and whether the CPU or the GPU is the bottleneck.

On a GPU, ``torch.profiler`` records every kernel launch (runtime API calls on the CPU side, kernels on the GPU
side); from one trace we read the launch count, the CPU time spent dispatching, and the GPU busy time. On a CPU
there are no kernels, so we count dispatched ATen ops (a proxy for launches: each would be at least one kernel),
and each fused-kernel call as one launch however many ops its CPU emulation runs.

:func:`time_by_family` sorts the same trace's GPU time into the op families of ``gemma4lab.lab.floors`` (expert GEMM,
dense GEMM, attention, routing, row kernels, other), by kernel name (:data:`KERNEL_FAMILIES`), so that a profile
stands beside its op-level floor family by family, and :func:`timeline_gaps` says where the GPU waited between
kernels (which kernel each gap came before), so idle time is located, not only counted.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from gemma4lab.lab.floors import FAMILIES

_LAUNCH_APIS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")


def _merge(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals (GPU busy time with overlapping streams)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence what native code writes to file descriptor 2 meanwhile: the profiler's C++ side prints a
    ``USDT: … profiler_start`` / ``profiler_stop`` line at every start and stop, which Jupyter shows in red under the
    cell like an error. Only the profiler's start and stop are wrapped, never the profiled call."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real descriptor 2 (some embedded interpreters): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _record(fn: Callable[[], object], warmup: int, trace_path: str | Path | None = None) -> tuple[list, float, bool]:
    """The profiler's events of one call of ``fn`` (after ``warmup`` calls), its wall time in ms, and whether the GPU
    was traced."""
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities)
    t0 = time.perf_counter()
    with _quiet_native_stderr():
        prof.__enter__()
    try:
        fn()
        if cuda:
            torch.cuda.synchronize()
    finally:
        with _quiet_native_stderr():
            prof.__exit__(None, None, None)
    wall_ms = (time.perf_counter() - t0) * 1e3
    if trace_path is not None:
        prof.export_chrome_trace(str(trace_path))
    return list(prof.events()), wall_ms, cuda


def timeline_of(spans: Iterable[tuple[str, float, float]]) -> list[list]:
    """``[short name, family, start µs, duration µs]`` per kernel, in start order, the first starting at 0: what a
    Gantt chart of one call needs (and small enough to keep in a results file)."""
    spans = sorted(spans, key=lambda s: s[1])
    t0 = spans[0][1] if spans else 0.0
    return [[_short(n), kernel_family(n), round(a - t0, 3), round(b - a, 3)] for n, a, b in spans]


def profile_forward(fn: Callable[[], object], *, warmup: int = 2, trace_path: str | Path | None = None,
                    timeline: bool = False) -> dict:
    """Profile one call of ``fn`` (after ``warmup`` calls). Returns a JSON-ready summary.

    Keys: ``kernels`` (GPU kernel launches, or dispatched ops on CPU), ``graph_launches``, ``top_kernels``,
    ``wall_ms``, ``cpu_dispatch_ms`` (CPU time inside launch calls), ``gpu_busy_ms`` (union of kernel intervals);
    with ``timeline``, also ``timeline`` (:func:`timeline_of` the GPU kernels; on CPU, of the dispatched ops).
    """
    events, wall_ms, cuda = _record(fn, warmup, trace_path)
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and _is_kernel(e.name)]
        launches = [e for e in events if e.name in _LAUNCH_APIS]
        graphs = [e for e in events if e.name == "cudaGraphLaunch"]
        counts = Counter(_short(e.name) for e in kernels)
        busy = _merge([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e3
        dispatch = sum(e.cpu_time_total for e in launches) / 1e3
        out = {
            "device": "cuda",
            "kernels": len(kernels),
            "launch_calls": len(launches) - len(graphs),
            "graph_launches": len(graphs),
            "top_kernels": counts.most_common(25),
            "wall_ms": wall_ms,
            "cpu_dispatch_ms": dispatch,
            "gpu_busy_ms": busy,
        }
        if timeline:
            out["timeline"] = timeline_of((e.name, e.time_range.start, e.time_range.end) for e in kernels)
        return out
    # A fused kernel on CPU (interpreter or torch reference) is one ``gemma4lab::`` range: one launch, whatever
    # tensor ops it runs inside.
    markers = [e for e in events if e.name.startswith("gemma4lab::")]
    ops = [e for e in events if e.name.startswith("aten::") and _is_leaf_op(e) and not _inside_marker(e)]
    ops += markers
    counts = Counter(e.name for e in ops)
    out = {
        "device": "cpu",
        "kernels": len(ops),
        "launch_calls": len(ops),
        "graph_launches": 0,
        "top_kernels": counts.most_common(25),
        "wall_ms": wall_ms,
        "cpu_dispatch_ms": wall_ms,
        "gpu_busy_ms": 0.0,
    }
    if timeline:
        out["timeline"] = timeline_of((e.name, e.time_range.start, e.time_range.end) for e in ops)
    return out


def _is_kernel(name: str) -> bool:
    return not name.startswith(("Memcpy", "Memset", "cuda", "cu"))


def _base(name: str) -> str:
    """A kernel's name without its template and call arguments (an anonymous namespace is dropped, not cut at)."""
    return re.split(r"[(<]", name.replace("(anonymous namespace)::", ""), maxsplit=1)[0]


def _short(name: str) -> str:
    return _base(name)[:80]


# Ops that launch nothing on their own (views, metadata) are not counted in the CPU proxy.
_NO_KERNEL = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::transpose", "aten::t", "aten::permute",
    "aten::expand", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::as_strided",
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::chunk", "aten::split", "aten::narrow",
    "aten::detach", "aten::lift_fresh", "aten::alias", "aten::unbind", "aten::resolve_conj", "aten::resolve_neg",
    "aten::_unsafe_view", "aten::contiguous", "aten::result_type", "aten::item", "aten::_local_scalar_dense",
    "aten::is_nonzero", "aten::size", "aten::stride", "aten::numel", "aten::dim", "aten::to", "aten::_to_copy",
}


def _under(e, prefixes: tuple[str, ...]) -> bool:
    """Whether a CPU event runs inside an op whose name starts with one of ``prefixes``."""
    p = e.cpu_parent
    while p is not None:
        if p.name.startswith(prefixes):
            return True
        p = p.cpu_parent
    return False


def _inside_marker(e) -> bool:
    return _under(e, ("gemma4lab::",))


def _is_leaf_op(e) -> bool:
    """An op that launches work itself: not a view or metadata op, and no op below it that does (an ``aten::mm``
    whose only children are views counts; an ``aten::matmul`` that calls ``aten::mm`` does not, nor does an
    ``aten::to`` whose ``aten::copy_`` is counted instead)."""
    return e.name not in _NO_KERNEL and not _launches_below(e)


def _launches_below(e) -> bool:
    return any(c.name.startswith("aten::") and (_is_leaf_op(c) or _launches_below(c)) for c in e.cpu_children)


# ---- GPU time by family ------------------------------------------------------------------------------------------
#: (pattern, family): a kernel (or, on CPU, a dispatched op) belongs to the family of the first pattern its name
#: matches (``re.search``, case-insensitive); no match: ``"other"``. Order matters: our Triton kernels first (the
#: post-attention block is not attention), grouped GEMMs before dense ones, routing's index kernels before the
#: elementwise ones.
KERNEL_FAMILIES: tuple[tuple[str, str], ...] = (
    (r"_moe_gemm_kernel|gemma4lab::moe_gemm", "expert_gemm"),
    (r"_(prefill|decode)_attention_kernel|gemma4lab::(prefill|decode)_attention", "attention"),
    (r"_router_topk_kernel|_moe_combine_kernel|gemma4lab::(router_topk|moe_combine)", "routing"),
    (r"_qkv_norm_rope_kernel|_post_attention_kernel|_gelu_tanh_mul_kernel|rmsnorm|gemma4lab::", "row_kernels"),
    (r"enable_3x_kernel_for_sm9x|prepare_grouped_gemm_data|grouped_?mm|grouped_?gemm", "expert_gemm"),
    (r"flash|fmha|attention", "attention"),
    (r"embedding|indexSelect", "other"),
    (r"radix_?sort|DeviceScan|DeviceSegmented|index_elementwise|aten::index(_put_?)?$|gather|scatter|histc|"
     r"bincount|topk|sort|softmax|cumsum|unique|nonzero", "routing"),
    (r"nvjet|cutlass|gemm|gemv|xmma|cublas|Kernel2|aten::(mm|addmm|bmm|matmul|linear)$", "dense_gemm"),
    (r"elementwise|reduce|Memcpy DtoD|Memset|CatArray|aten::", "row_kernels"),
)
_PATTERNS = [(re.compile(p, re.IGNORECASE), fam) for p, fam in KERNEL_FAMILIES]


def kernel_family(name: str) -> str:
    """The family (one of ``gemma4lab.lab.floors.FAMILIES``) of a kernel or dispatched op, from its name."""
    if not isinstance(name, str):
        raise TypeError(f"a kernel name must be a str, got {type(name).__name__}")
    base = _base(name)
    return next((fam for pat, fam in _PATTERNS if pat.search(base)), "other")


def idle_ms(wall_ms: float, busy_ms: float) -> float:
    """How long the GPU waited during a call of ``wall_ms``, ``busy_ms`` of it busy (never below 0: a busy time
    from a profiled call may exceed a latency timed apart)."""
    return max(0.0, wall_ms - busy_ms)


def family_times(spans: Iterable[tuple[str, float, float]], wall_ms: float) -> dict:
    """Busy ms per family from ``(family, start_us, end_us)`` spans (the union of each family's intervals, so
    overlapping streams count once), the busy ms of all of them together, and idle = wall − busy."""
    by: dict[str, list[tuple[float, float]]] = {fam: [] for fam in FAMILIES}
    for fam, start, end in spans:
        if fam not in by:
            raise ValueError(f"unknown family {fam!r}; expected one of {FAMILIES}")
        if end < start:
            raise ValueError(f"a span ends before it starts: {start} > {end}")
        by[fam].append((start, end))
    busy = _merge([iv for ivs in by.values() for iv in ivs]) / 1e3
    return {"families_ms": {fam: _merge(ivs) / 1e3 for fam, ivs in by.items()}, "busy_ms": busy,
            "wall_ms": wall_ms, "idle_ms": idle_ms(wall_ms, busy)}


_OPS = ("aten::", "gemma4lab::")


def kernel_gaps(spans: Iterable[tuple[str, float, float]]) -> list[tuple[float, str, str]]:
    """The gaps between consecutive ``(name, start_us, end_us)`` spans, in start order, as ``(µs, kernel before,
    kernel after)``: where the GPU waited. An overlap is no gap, and a kernel nested in a longer one does not end
    the longer one (the next gap is measured from the later end)."""
    ordered = sorted(((str(n), float(a), float(b)) for n, a, b in spans), key=lambda s: s[1])
    gaps: list[tuple[float, str, str]] = []
    end, before = None, ""
    for name, start, stop in ordered:
        if stop < start:
            raise ValueError(f"a span ends before it starts: {start} > {stop}")
        short = _short(name).strip()
        if end is not None and start > end:
            gaps.append((start - end, before, short))
        if end is None or stop >= end:
            end, before = stop, short
    return gaps


def timeline_gaps(spans: Iterable[tuple[str, float, float]], *, top: int = 12) -> dict:
    """Where the GPU waited inside a trace (:func:`kernel_gaps`), summarised: ``sum_ms`` and ``count`` of all
    gaps; ``largest``: the ``top`` widest as ``[µs, kernel before, kernel after]``; ``by_next_us``: µs of gaps summed
    by the kernel that follows them (a gap before a kernel is its launch inside a graph, or the host queueing it, or
    a wait on something outside the stream); ``span_ms``: first start to last end. Under the profiler the host runs
    slower, so gaps the host causes are overstated; those inside one CUDA graph are not."""
    if top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    spans = [(str(n), float(a), float(b)) for n, a, b in spans]
    gaps = kernel_gaps(spans)
    by_next: dict[str, float] = {}
    for width, _, after in gaps:
        by_next[after] = by_next.get(after, 0.0) + width
    widest = sorted(gaps, key=lambda g: -g[0])
    span_ms = (max(b for _, _, b in spans) - min(a for _, a, _ in spans)) / 1e3 if spans else 0.0
    return {"sum_ms": sum(g for g, _, _ in gaps) / 1e3, "count": len(gaps), "span_ms": span_ms,
            "largest": [[round(g, 2), a, b] for g, a, b in widest[:top]],
            "by_next_us": {k: round(v, 2) for k, v in sorted(by_next.items(), key=lambda kv: -kv[1])[:top]}}


def graph_launch_gaps(spans: Iterable[tuple[str, float, float]]) -> dict:
    """Where the host spends a call that replays CUDA graphs, from its CPU-side ``(name, start_us, end_us)`` events:
    ``launches`` (``cudaGraphLaunch`` calls); ``lead_ms`` from the call's first event to the first launch (setup:
    checks, copies, the packed batch); ``between_ms``: the host's time from one launch's end to the next one's start
    (the eager work between pieces), as ``sum`` / ``median`` / ``max``; ``tail_ms`` from the last launch's end to the
    call's last event (the head, the result). While the host's time between two launches stays below the GPU's time
    for a piece, the GPU never waits mid-forward: its idle time is then the lead and the tail."""
    spans = sorted(((str(n), float(a), float(b)) for n, a, b in spans), key=lambda s: s[1])
    launches = [(a, b) for n, a, b in spans if n == "cudaGraphLaunch"]
    out: dict[str, Any] = {"launches": len(launches)}
    if not launches:
        return {**out, "lead_ms": None, "between_ms": None, "tail_ms": None}
    between = sorted(max(0.0, nxt[0] - cur[1]) / 1e3 for cur, nxt in zip(launches, launches[1:]))
    return {**out, "lead_ms": (launches[0][0] - spans[0][1]) / 1e3,
            "between_ms": {"sum": sum(between), "median": between[len(between) // 2] if between else 0.0,
                           "max": between[-1] if between else 0.0},
            "tail_ms": (max(b for _, _, b in spans) - launches[-1][1]) / 1e3}


def host_launch_times(fn: Callable[[], object], *, warmup: int = 2) -> dict:
    """:func:`graph_launch_gaps` of one profiled call of ``fn`` (after ``warmup`` calls): the host's side of a
    graphed forward (the profiler slows the host, so the figures are upper bounds)."""
    events, _, _ = _record(fn, warmup)
    return graph_launch_gaps((e.name, e.time_range.start, e.time_range.end) for e in events
                             if e.device_type == torch.autograd.DeviceType.CPU)


def family_summary(fn: Callable[[], object], *, wall_ms: float | None = None) -> dict:
    """What a results file keeps of :func:`time_by_family`: ms per family, busy, idle, wall, and what was counted."""
    prof = time_by_family(fn, wall_ms=wall_ms)
    return {k: prof[k] for k in ("families_ms", "busy_ms", "idle_ms", "wall_ms", "source", "gaps")}


def time_by_family(fn: Callable[[], object], *, warmup: int = 2, wall_ms: float | None = None) -> dict:
    """GPU time of one call of ``fn`` (after ``warmup`` calls) by family, plus busy, wall and idle ms.

    ``wall_ms``: the call's latency timed apart (the profiler slows the host, so the profiled call's own wall time,
    the default, overstates idle time). GPU: every kernel, copy and memset of the trace, classified by name
    (:func:`kernel_family`). CPU, where there are no kernels: the CPU time of the ops the model dispatched (a proxy;
    e.g. the looped experts' matmuls count as dense GEMM there), each op classified by its own name. ``gaps``: the
    :func:`timeline_gaps` of the same spans (on CPU, between dispatched ops: host time, a proxy like the rest).
    """
    if wall_ms is not None:
        if isinstance(wall_ms, bool) or not isinstance(wall_ms, (int, float)):
            raise TypeError(f"wall_ms must be a number or None, got {type(wall_ms).__name__}")
        if not wall_ms > 0 or wall_ms == float("inf"):
            raise ValueError(f"wall_ms must be a finite number > 0, got {wall_ms}")
    events, profiled_ms, cuda = _record(fn, warmup)
    if cuda:
        named = [(e.name, e.time_range.start, e.time_range.end) for e in events
                 if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        named = [(e.name, e.time_range.start, e.time_range.end) for e in events
                 if e.name.startswith(_OPS) and not _under(e, _OPS)]  # the ops the model's code called itself
    spans = [(kernel_family(n), a, b) for n, a, b in named]
    out = family_times(spans, profiled_ms if wall_ms is None else float(wall_ms))
    return {**out, "gaps": timeline_gaps(named), "device": "cuda" if cuda else "cpu", "events": len(spans),
            "source": "GPU kernels, copies and memsets" if cuda else "CPU time of dispatched ops (no GPU: a proxy)",
            "wall_source": "the profiled call" if wall_ms is None else "timed apart"}
