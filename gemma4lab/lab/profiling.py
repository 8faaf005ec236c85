"""How many kernels a forward launches, and whether the CPU or the GPU is the bottleneck.

On a GPU, ``torch.profiler`` records every kernel launch (runtime API calls on the CPU side, kernels on the GPU
side); from one trace we read the launch count, the CPU time spent dispatching, and the GPU busy time. On a CPU
there are no kernels, so we count dispatched ATen ops (a proxy for launches: each would be at least one kernel),
and each fused-kernel call as one launch however many ops its CPU emulation runs.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

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


def profile_forward(fn: Callable[[], object], *, warmup: int = 2, trace_path: str | Path | None = None) -> dict:
    """Profile one call of ``fn`` (after ``warmup`` calls). Returns a JSON-ready summary.

    Keys: ``kernels`` (GPU kernel launches, or dispatched ops on CPU), ``graph_launches``, ``top_kernels``,
    ``wall_ms``, ``cpu_dispatch_ms`` (CPU time inside launch calls), ``gpu_busy_ms`` (union of kernel intervals).
    """
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3
    events = prof.events()
    if trace_path is not None:
        prof.export_chrome_trace(str(trace_path))
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and _is_kernel(e.name)]
        launches = [e for e in events if e.name in _LAUNCH_APIS]
        graphs = [e for e in events if e.name == "cudaGraphLaunch"]
        counts = Counter(_short(e.name) for e in kernels)
        busy = _merge([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e3
        dispatch = sum(e.cpu_time_total for e in launches) / 1e3
        return {
            "device": "cuda",
            "kernels": len(kernels),
            "launch_calls": len(launches) - len(graphs),
            "graph_launches": len(graphs),
            "top_kernels": counts.most_common(25),
            "wall_ms": wall_ms,
            "cpu_dispatch_ms": dispatch,
            "gpu_busy_ms": busy,
        }
    # A fused kernel on CPU (interpreter or torch reference) is one ``gemma4lab::`` range: one launch, whatever
    # tensor ops it runs inside.
    markers = [e for e in events if e.name.startswith("gemma4lab::")]
    ops = [e for e in events if e.name.startswith("aten::") and _is_leaf_op(e) and not _inside_marker(e)]
    ops += markers
    counts = Counter(e.name for e in ops)
    return {
        "device": "cpu",
        "kernels": len(ops),
        "launch_calls": len(ops),
        "graph_launches": 0,
        "top_kernels": counts.most_common(25),
        "wall_ms": wall_ms,
        "cpu_dispatch_ms": wall_ms,
        "gpu_busy_ms": 0.0,
    }


def _is_kernel(name: str) -> bool:
    return not name.startswith(("Memcpy", "Memset", "cuda", "cu"))


def _short(name: str) -> str:
    return name.split("(")[0].split("<")[0][:80]


# Ops that launch nothing on their own (views, metadata) are not counted in the CPU proxy.
_NO_KERNEL = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::transpose", "aten::t", "aten::permute",
    "aten::expand", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::as_strided",
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::chunk", "aten::split", "aten::narrow",
    "aten::detach", "aten::lift_fresh", "aten::alias", "aten::unbind", "aten::resolve_conj", "aten::resolve_neg",
    "aten::_unsafe_view", "aten::contiguous", "aten::result_type", "aten::item", "aten::_local_scalar_dense",
    "aten::is_nonzero", "aten::size", "aten::stride", "aten::numel", "aten::dim", "aten::to", "aten::_to_copy",
}


def _inside_marker(e) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name.startswith("gemma4lab::"):
            return True
        p = p.cpu_parent
    return False


def _is_leaf_op(e) -> bool:
    return e.name not in _NO_KERNEL and not any(c.name.startswith("aten::") for c in e.cpu_children)
