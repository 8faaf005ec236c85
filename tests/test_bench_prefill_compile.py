"""bench-prefill's torch.compile columns on the tiny config on CPU (a file of its own: its minute of compilation runs
beside test_bench_prefill.py's fixture instead of after it)."""

from __future__ import annotations

import pytest

from gemma4lab.lab import measure
from gemma4lab.lab.bench import prefill


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_compile")
    argv = ["--device", "cpu", "--preset", "tiny", "--tokens", "12", "--parts", "eager,compile_fused,compile_pieces",
            "--rep-ms", "5", "--compile-extra-tokens", "7,25", "--dtype", "float32", "--out", str(out)]
    assert prefill.main(argv) == 0
    return out, measure.read_json(out / "prefill_cpu.json")


def test_compiled_fused_model_serves_every_length_with_one_graph(result):
    _, doc = result
    assert "errors" not in doc
    c = doc["compile"]["compile_fused"]
    assert c["graphs_compiled"] == 1 and c["fullgraph"] and c["lengths"] == [12, 7, 25]
    assert all(r["compile_fused_ms"] > 0 and r["compile_pieces_ms"] > 0 for r in doc["rows"].values())
    assert all(e["max_abs_vs_eager"] < 1e-4 for e in c["extra_lengths"].values())
