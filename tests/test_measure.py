# ruff: noqa: E402
import os

import torch

if not torch.cuda.is_available():  # before gemma4lab is imported: CPU-only machines run kernels in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json

import pytest

from gemma4lab.kernels import INTERPRET
from gemma4lab.lab import measure


def test_bench_on_cpu_returns_median_ms():
    calls = []
    ms = measure.bench(lambda: calls.append(1), warmup_ms=0, rep_ms=1, device="cpu")
    assert ms >= 0 and len(calls) >= 4  # one warm-up + at least three timed calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_bench_cuda_graph_needs_cuda():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        measure.bench_cuda_graph(lambda: None)


def test_roofs_on_cpu():
    assert measure.copy_bandwidth("cpu", nbytes=2**16, warmup_ms=0, rep_ms=1) > 0
    assert measure.matmul_rate("cpu", n=32, dtype=torch.float32, warmup_ms=0, rep_ms=1) > 0
    floors = measure.empty_kernel_time("cpu", warmup_ms=0, rep_ms=1)
    assert floors["graph_ms"] is None
    assert (floors["eager_ms"] > 0) if INTERPRET else floors["eager_ms"] is None


def test_environment_and_slug():
    env = measure.environment()
    assert {"card", "torch", "triton", "transformers", "python", "cuda", "date_utc"} <= env.keys()
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
