import json

import pytest
import torch

from gemma4lab.kernels import INTERPRET
from gemma4lab.lab import measure


def test_bench_on_cpu_returns_median_ms():
    import time

    calls = []
    ms = measure.bench(lambda: (calls.append(1), time.sleep(0.002)), warmup_ms=0, rep_ms=1, device="cpu")
    assert 2.0 <= ms < 50 and len(calls) >= 4  # one warm-up + at least three timed calls of >= 2 ms


def test_time_stats_reports_the_spread():
    st = measure.time_stats(lambda: None, warmup_ms=0, rep_ms=2, device="cpu")
    assert st["runs"] >= 3 and st["min_ms"] <= st["q20_ms"] <= st["median_ms"] <= st["q80_ms"] <= st["max_ms"]


def test_spread_of_known_values():
    assert measure.spread([5.0, 1.0, 3.0, 2.0, 4.0]) == {"median_ms": 3.0, "min_ms": 1.0, "max_ms": 5.0,
                                                         "q20_ms": 2.0, "q80_ms": 4.0, "runs": 5}
    with pytest.raises(ValueError, match="at least one"):
        measure.spread([])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_bench_cuda_graph_needs_cuda():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        measure.bench_cuda_graph(lambda: None)


def test_cpu_timing_call_counts():
    """At least three timed calls, after one warm-up call unless the caller has just made one (``warm``)."""
    calls = []
    for warm, expected in ((False, 4), (True, 3)):
        calls.clear()
        st = measure.time_stats(lambda: calls.append(1), warmup_ms=0, rep_ms=0, device="cpu", warm=warm)
        assert len(calls) == expected and st["runs"] == 3


def test_roofs_on_cpu():
    assert measure.copy_bandwidth("cpu", nbytes=2**16, warmup_ms=0, rep_ms=1) > 0
    assert measure.matmul_rate("cpu", n=32, dtype=torch.float32, warmup_ms=0, rep_ms=1) > 0
    floors = measure.empty_kernel_time("cpu", warmup_ms=0, rep_ms=1)
    assert floors["graph_ms"] is None
    assert (floors["eager_ms"] > 0) if INTERPRET else floors["eager_ms"] is None


def test_environment_and_slug():
    env = measure.environment()
    keys = {"card", "torch", "triton", "transformers", "python", "cuda", "date_utc", "git_commit", "git_dirty"}
    assert keys <= env.keys()
    assert env["git_commit"] is None or len(env["git_commit"]) == 40
    assert env["date_utc"].endswith("+00:00")
    assert not any("host" in k for k in env)
    if not torch.cuda.is_available():
        assert env["card"] == "cpu" and measure.card_slug() == "cpu"


def test_write_json_guards_foreign_files(tmp_path):
    path = tmp_path / "r" / "x.json"
    measure.write_json(path, {"value": 1.0, "bad": float("nan")})
    doc = json.loads(path.read_text())
    assert doc["producer"] == "gemma4lab" and doc["value"] == 1.0 and doc["bad"] is None and "environment" in doc
    measure.write_json(path, {"value": 2})  # ours: may be replaced
    assert measure.read_json(path)["value"] == 2
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"someone": "else"}')
    with pytest.raises(FileExistsError, match="not produced by gemma4lab"):
        measure.write_json(foreign, {"value": 3})
    assert json.loads(foreign.read_text()) == {"someone": "else"}
    measure.write_json(foreign, {"value": 3}, overwrite=True)
    assert measure.read_json(foreign)["value"] == 3


def test_call_timer_times_each_call_in_order():
    import time

    timer = measure.CallTimer(lambda s: time.sleep(s) or s, "cpu")
    assert [timer(s) for s in (0.002, 0.02, 0.002)] == [0.002, 0.02, 0.002]
    ms = timer.ms()
    assert len(ms) == 3 and ms[1] > ms[0] and ms[1] > ms[2] and ms[1] >= 20
