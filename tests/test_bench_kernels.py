"""``bench-kernels`` end to end on CPU (``--quick``: tiny shapes, the interpreter): every op description in
``gemma4lab.lab.bench.ops`` builds, runs, matches its unfused model code, and lands in a result file and a figure."""

from __future__ import annotations

from gemma4lab.lab import measure
from gemma4lab.lab.bench import kernels as bench


def test_quick_run_writes_every_kernel(tmp_path):
    assert bench.main(["--quick", "--tokens", "1,3", "--device", "cpu", "--out", str(tmp_path)]) == 0
    doc = measure.read_json(tmp_path / "kernels_cpu.json")
    assert doc["environment"]["card"] == "cpu"
    assert {r["kernel"] for r in doc["results"]} == set(bench.KERNELS)
    assert len(doc["results"]) == 2 * len(bench.KERNELS) and not doc["errors"]
    for r in doc["results"]:
        assert r["backend"] == "triton-interpreter"
        assert r["triton_stats"]["runs"] >= 3 and r["eager_stats"]["runs"] >= 3
        assert r["compile_ms"] is None and r["graph_ms"] is None
        assert r["rel_err_vs_unfused"] < 1e-2  # fp32: the kernel and the unfused model agree to rounding
        if r["kernel"] in ("rmsnorm_residual_scalar", "dual_rmsnorm_residual_scalar"):  # the published-layout peer
            assert r["published_stats"]["runs"] >= 3 and r["published_graph_ms"] is None
            assert r["triton_vs_published"] == r["published_ms"] / r["triton_ms"]
        else:
            assert "published_ms" not in r
    assert doc["skipped"]["compile"] and doc["skipped"]["graph"]
    assert (tmp_path / "kernels_cpu.png").stat().st_size > 0
    # --merge keeps the rows of kernels not re-run
    assert bench.main(["--quick", "--tokens", "1", "--device", "cpu", "--out", str(tmp_path),
                       "--kernels", "router_topk", "--merge"]) == 0
    assert len(measure.read_json(tmp_path / "kernels_cpu.json")["results"]) == 2 * len(bench.KERNELS) - 1


def test_quick_sweep_covers_every_family(tmp_path):
    assert bench.main(["--quick", "--tokens", "2", "--device", "cpu", "--out", str(tmp_path), "--sweep",
                       "--kernels", "dual_rmsnorm_residual_scalar,router_topk,gelu_tanh_mul,qkv_norm_rope_full"]) == 0
    doc = measure.read_json(tmp_path / "kernels_cpu.json")
    assert not doc["errors"] and {s["kernel"] for s in doc["sweep"]} == {
        "dual_rmsnorm_residual_scalar", "router_topk", "gelu_tanh_mul", "qkv_norm_rope_full"}


def test_router_logits_have_no_ties_so_the_accuracy_column_measures_arithmetic():
    """bench-kernels' router logits: distinct in every bf16 row, so the kernel and torch.topk must pick the same
    experts — a difference left in the accuracy column is then arithmetic, not a tie broken the other way."""
    import torch

    from gemma4lab import kernels as K
    from gemma4lab.lab.bench.ops import _tie_free_logits

    logits = _tie_free_logits(torch.Generator().manual_seed(0), "cpu", torch.bfloat16, 37, 128)
    assert all(len(set(row.tolist())) == 128 for row in logits)
    scale = torch.ones(128, dtype=torch.bfloat16)
    _, ids = K.gemma_router_topk(logits.float(), scale.float(), 8)
    assert torch.equal(ids, torch.softmax(logits.float(), -1).topk(8, dim=-1).indices)
