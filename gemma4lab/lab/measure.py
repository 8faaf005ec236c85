"""Timing, bandwidth and provenance helpers shared by every benchmark in the repo.

Rules they enforce: medians (robust to stragglers), CUDA timings through ``triton.testing.do_bench`` (CUDA events,
L2 flushed between runs), CPU timings through ``time.perf_counter`` (Triton's GPU driver is never touched on a
CPU-only machine), and every result file carries the environment it was measured in and a ``producer`` tag so that
nothing else is ever overwritten by accident.
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PRODUCER = "gemma4lab"


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---- timing ---------------------------------------------------------------------------------------------------
def time_stats(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100,
               device: str | torch.device | None = None, warm: bool = False) -> dict[str, float]:
    """Milliseconds per call of ``fn`` over repeated runs: ``median_ms``, ``min_ms``, ``max_ms``, the 20 / 80 %
    quantiles ``q20_ms`` / ``q80_ms`` and ``runs`` (at least 3). CUDA (default when available):
    ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs). CPU: a ``perf_counter`` loop (at least 1
    warm-up and 3 timed calls, however slow ``fn`` is; ``warm``: the caller has just called ``fn``, so the one
    forced warm-up call is skipped — a whole-model forward under the CPU interpreter takes seconds). Result files
    record all of these, so a reader sees the spread of a number and not only its centre."""
    dev = _device(device)
    if dev.type == "cuda":
        once = _cuda_call_ms(fn)
        if 5 * once <= rep_ms:  # fast calls: do_bench (many runs, L2 flushed between them)
            import triton.testing

            times = [float(t) for t in triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")]
        else:  # slow calls (a whole-model forward): do_bench would time a single run; take at least three
            for _ in range(max(1, round(warmup_ms / once))):
                fn()
            times = [_cuda_call_ms(fn) for _ in range(max(3, round(rep_ms / once)))]
    else:
        if not warm:
            fn()
        stop = time.perf_counter() + warmup_ms / 1e3
        while time.perf_counter() < stop:
            fn()
        times = []
        stop = time.perf_counter() + rep_ms / 1e3
        while len(times) < 3 or (time.perf_counter() < stop and len(times) < 100_000):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return spread(times)


def _cuda_call_ms(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end))


class CallTimer:
    """``fn`` timed at every call inside a loop that must not be synchronised (a generation loop, whose own host
    work is what the caller measures around it). On a GPU: CUDA events around each call, read after the loop, so an
    interval is the device time from the call's first queued work to its last (any wait for the host to queue it
    included); on CPU, where every call is synchronous, ``perf_counter``. :meth:`ms` returns them in call order."""

    def __init__(self, fn: Callable[..., Any], device: str | torch.device | None = None) -> None:
        self.fn = fn
        self.cuda = _device(device).type == "cuda"
        self._marks: list[Any] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.cuda:
            t0 = time.perf_counter()
            out = self.fn(*args, **kwargs)
            self._marks.append((time.perf_counter() - t0) * 1e3)
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.fn(*args, **kwargs)
        end.record()
        self._marks.append((start, end))
        return out

    def ms(self) -> list[float]:
        """Milliseconds of each call so far (synchronises the device once)."""
        if not self.cuda:
            return list(self._marks)
        torch.cuda.synchronize()
        return [float(a.elapsed_time(b)) for a, b in self._marks]


def spread(times_ms: list[float]) -> dict[str, float]:
    """Median, min, max, 20 / 80 % quantiles and count of a list of timings in ms (see :func:`time_stats`)."""
    if not times_ms:
        raise ValueError("spread() needs at least one timing")
    xs = sorted(times_ms)
    q = lambda f: xs[min(len(xs) - 1, max(0, round(f * (len(xs) - 1))))]  # noqa: E731
    return {"median_ms": statistics.median(xs), "min_ms": xs[0], "max_ms": xs[-1], "q20_ms": q(0.2),
            "q80_ms": q(0.8), "runs": len(xs)}


def bench(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100,
          device: str | torch.device | None = None) -> float:
    """Median milliseconds per call of ``fn`` (:func:`time_stats` has the spread too)."""
    return time_stats(fn, warmup_ms=warmup_ms, rep_ms=rep_ms, device=device)["median_ms"]


def bench_cuda_graph(fn: Callable[[], object], *, replays_per_graph: int = 20, warmup_ms: float = 25,
                     rep_ms: float = 100) -> float:
    """Median milliseconds per call of ``fn`` when ``replays_per_graph`` calls are captured in one CUDA graph:
    what a call costs with CPU launch overhead removed (the floor piecewise CUDA graphs can reach).
    ``fn`` must be capturable (static buffers, no host sync)."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench_cuda_graph needs a CUDA device; CUDA graphs do not exist on CPU")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile, allocate) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(replays_per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return bench(graph.replay, warmup_ms=warmup_ms, rep_ms=rep_ms, device="cuda") / replays_per_graph


def bench_cuda_graph_cycled(fn: Callable[[Any], object], sets: list, *, rep_ms: float = 100) -> float:
    """ms per call of ``fn(s)`` inside a CUDA graph whose captured calls take the next of ``sets`` in turn (at least
    8 calls a graph): with copies of a weight set whose cycle outgrows L2, every timed call streams from HBM, as a
    model's step does."""
    it = itertools.cycle(sets)
    return bench_cuda_graph(lambda: fn(next(it)), replays_per_graph=max(len(sets), 8), warmup_ms=5, rep_ms=rep_ms)


# ---- machine roofs --------------------------------------------------------------------------------------------
#: Roof measurements off a GPU (CPU runs of the benchmarks: tests, notebooks) use small problems — there the roofs
#: only have to exist for the pipeline to be checked, and an 8192³ matmul costs a 2-core CI machine seconds per call.
CPU_ROOF_MATMUL_N = 1024
CPU_ROOF_COPY_BYTES = 2**26


def copy_bandwidth(device: str | torch.device, nbytes: int | None = None, *, warmup_ms: float = 25,
                   rep_ms: float = 100) -> float:
    """Bytes/s of a device-to-device copy of ``nbytes`` (default 1 GiB on a GPU, :data:`CPU_ROOF_COPY_BYTES`
    elsewhere), counting the read and the write (median): the practical bandwidth roof that the fused kernels are
    compared against."""
    dev = _device(device)
    if nbytes is None:
        nbytes = 2**30 if dev.type == "cuda" else CPU_ROOF_COPY_BYTES
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), warmup_ms=warmup_ms, rep_ms=rep_ms, device=dev)
    return 2 * nbytes / (ms * 1e-3)


def release_memory() -> None:
    """Collect dropped models and hand the CUDA cache back, so that the next configuration in a long run starts
    from the same free memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64, the accuracy figure every benchmark records."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def matmul_rate(device: str | torch.device, n: int | None = None, dtype: torch.dtype = torch.bfloat16, *,
                warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """FLOP/s of an ``n x n x n`` matmul on random data (2 n^3 flops): the compute roof. ``n`` defaults to 8192 on
    a GPU and :data:`CPU_ROOF_MATMUL_N` elsewhere."""
    dev = _device(device)
    if n is None:
        n = 8192 if dev.type == "cuda" else CPU_ROOF_MATMUL_N
    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
    ms = bench(lambda: a @ b, warmup_ms=warmup_ms, rep_ms=rep_ms, device=dev)
    return 2 * n**3 / (ms * 1e-3)


def empty_kernel_time(device: str | torch.device, *, warmup_ms: float = 25,
                      rep_ms: float = 100) -> dict[str, float | None]:
    """Milliseconds of a trivial Triton kernel: ``eager_ms`` (Python launch included) and ``graph_ms`` (inside a
    CUDA graph): the floor for "within 2 us of an empty kernel". On CPU ``graph_ms`` is None and ``eager_ms`` is the
    interpreter's launch cost if ``TRITON_INTERPRET=1`` was set before import, else None."""
    from gemma4lab.kernels._common import INTERPRET, empty_kernel

    dev = _device(device)
    x = torch.zeros(1, device=dev)
    launch = lambda: empty_kernel[(1,)](x)
    if dev.type != "cuda":
        eager = bench(launch, warmup_ms=warmup_ms, rep_ms=rep_ms, device=dev) if INTERPRET else None
        return {"eager_ms": eager, "graph_ms": None}
    return {"eager_ms": bench(launch, warmup_ms=warmup_ms, rep_ms=rep_ms, device=dev),
            "graph_ms": bench_cuda_graph(launch, warmup_ms=warmup_ms, rep_ms=rep_ms)}


# ---- provenance -----------------------------------------------------------------------------------------------
def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the code that runs. ``GEMMA4LAB_GIT_COMMIT`` wins when set: a copy of the working tree on
    another machine (the GPU machine) may carry no ``.git``, or a stale one that would name the wrong commit."""
    import subprocess

    env = os.environ.get("GEMMA4LAB_GIT_COMMIT")
    if env:
        return env, False
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10, check=True).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


_SMI_FIELDS = ("driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem", "power.limit",
               "power.draw", "temperature.gpu", "persistence_mode")


def _smi_id() -> str:
    """nvidia-smi's name for torch's current device: its UUID (``GPU-…``), or index 0 where torch can't say."""
    try:
        return f"GPU-{torch.cuda.get_device_properties(torch.cuda.current_device()).uuid}"
    except (RuntimeError, AttributeError, AssertionError):
        return "0"


def gpu_state() -> dict[str, Any] | None:
    """Driver, current and maximum clocks (MHz), power limit and draw (W) and temperature of the GPU this process
    uses, read with ``nvidia-smi`` at the time of the measurement: a timing is only reproducible on a card in the same
    state. The card is named by UUID, since nvidia-smi ignores ``CUDA_VISIBLE_DEVICES``."""
    import subprocess

    out = ""
    for card in dict.fromkeys((_smi_id(), "0")):  # the UUID first; index 0 if this nvidia-smi won't take it
        try:
            out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(_SMI_FIELDS)}", "--format=csv,noheader,nounits",
                                  "-i", card], capture_output=True, text=True, timeout=20, check=True).stdout
            break
        except (OSError, subprocess.SubprocessError):
            continue
    values = [v.strip() for v in out.strip().splitlines()[0].split(",")] if out.strip() else []
    if len(values) != len(_SMI_FIELDS):
        return None

    def num(v: str) -> Any:
        try:
            return float(v)
        except ValueError:
            return v

    return {k.replace(".", "_"): (v if k in ("driver_version", "persistence_mode") else num(v))
            for k, v in zip(_SMI_FIELDS, values)}


def environment() -> dict[str, Any]:
    """What a number was measured on (no hostname): card, library versions, CUDA, the commit of the code, the GPU's
    driver, clocks and power limit, UTC time."""
    import triton

    commit, dirty = _git_commit()
    env: dict[str, Any] = {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "git_commit": commit,
        "git_dirty": dirty,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), gpu=gpu_state())
    return env


def card_slug() -> str:
    """Short lower-case card name for file names: "h100", "h200", "a100", ... or "cpu"."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    m = re.search(r"\b(gh200|gb200|[abhl]\d{2,3}[a-z]?|rtx ?\d{4})\b", name)
    if m:
        return m.group(1).replace(" ", "")
    return re.sub(r"[^a-z0-9]+", "-", name.replace("nvidia", "")).strip("-") or "gpu"


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: turn them into None (recursively)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A result file if it exists and was produced by gemma4lab, else None."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("producer") == PRODUCER else None


def write_json(path: str | Path, payload: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write ``payload`` plus ``producer`` and ``environment`` (a fresh one unless the payload has one). Refuses
    to replace an existing file that gemma4lab did not write, unless ``overwrite=True``."""
    path = Path(path)
    if path.exists() and not overwrite and read_json(path) is None:
        raise FileExistsError(f"{path} exists and was not produced by gemma4lab; pass overwrite=True to replace it")
    doc = {"producer": PRODUCER, **payload}
    doc.setdefault("environment", environment())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(doc), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path
