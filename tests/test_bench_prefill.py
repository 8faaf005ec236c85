"""bench-prefill's whole pipeline on the tiny config on CPU: every part it runs on the GPU must at least run here,
write a result file the report can read, and record the provenance and spread it promises."""

from __future__ import annotations

import pytest

from gemma4lab.lab import measure, report
from gemma4lab.lab.bench import prefill
from gemma4lab.lab.floors import FAMILIES


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # the torch.compile parts run in test_bench_prefill_compile.py and the vision part in test_bench_prefill_vision.py,
    # so the minute-long fixtures can run side by side
    parts = "accuracy,eager,hf,hf_patched,hf_patched_pcg,skew,layer,families,fp8"
    argv = ["--device", "cpu", "--preset", "tiny", "--tokens", "12", "--parts", parts, "--rep-ms", "5",
            "--layer-tokens", "12", "--dtype", "float32", "--out", str(out)]
    assert prefill.main(argv) == 0
    return out, measure.read_json(out / "prefill_cpu.json")


def test_columns_floors_and_spread(result):
    _, doc = result
    assert "errors" not in doc
    for key in ("rows", "rows_skewed"):
        for r in doc[key].values():
            assert r["floor_ms"] == max(r["weight_floor_ms"], r["compute_floor_ms"]) > 0
            st = r["eager_stats"] if key == "rows" else r["hf_stats"]
            assert st["runs"] >= 3 and st["min_ms"] <= st["median_ms"] <= st["max_ms"]
            assert st["first_call_s"] > 0
    assert doc["hf_experts_implementation"] == "grouped_mm"
    assert doc["routing"]["skewed"]["exponent"] == 1.0
    assert doc["environment"]["git_commit"] is None or len(doc["environment"]["git_commit"]) == 40


def test_transformers_patched_in_place_is_timed_beside_the_unpatched(result):
    """The patched transformers model (fused; fused + PCG) on the same weights: timed, equal to the unpatched model
    within fp32 rounding, and the PCG column really went through the runner (no call fell back to transformers)."""
    _, doc = result
    for r in doc["rows"].values():
        for col in ("hf_patched", "hf_patched_pcg"):
            assert r[f"{col}_ms"] > 0
            assert r[f"{col}_vs_hf_max_abs"] < 1e-4
    stats = doc["hf_patched"]["route_stats"]
    assert stats["transformers_calls"] == 0
    assert "hf_patched_ms" not in next(iter(doc["rows_skewed"].values()))  # measured once, at uniform routing


def test_op_level_floor_beside_the_single_one(result):
    _, doc = result
    for r in (*doc["rows"].values(), *doc["rows_skewed"].values()):
        assert r["op_floor_ms"] > r["floor_ms"]  # op by op can never beat one roof for the whole forward
        assert list(r["op_floor_by_family_ms"]) == list(FAMILIES)
        assert sum(r["op_floor_by_family_ms"].values()) == pytest.approx(r["op_floor_ms"])
    for r in doc["rows"].values():
        assert r["eager_x_op_floor"] == r["eager_ms"] / r["op_floor_ms"]


def test_gpu_time_by_family_stands_beside_each_familys_floor(result):
    """On CPU the PCG runner runs its pieces eagerly and the profile times dispatched ops: the structure is the
    GPU's, the times a proxy that says so."""
    _, doc = result
    for r in doc["rows"].values():
        for key in ("families", "families_fused"):
            fam = r[key]
            for f in FAMILIES:
                assert fam[f]["floor_ms"] == r["op_floor_by_family_ms"][f]
            assert fam["busy_ms"] <= sum(fam[f]["gpu_ms"] for f in FAMILIES) + 1e-9
            assert fam["dense_gemm"]["gpu_ms"] > 0 and fam["attention"]["gpu_ms"] > 0
            assert fam["idle_ms"] == pytest.approx(fam["wall_ms"] - fam["busy_ms"])
            assert fam["op_floor_ms"] == r["op_floor_ms"] and "dispatched ops" in fam["source"]
        assert r["families"]["wall_source"] == "the profiled call"  # no PCG column timed in this run
    assert "families" not in next(iter(doc["rows_skewed"].values()))


def test_accuracy_parts_are_recorded(result):
    _, doc = result
    assert set(doc["accuracy_shallow"]["depths"]) == {"1", "2", "6"}
    per = doc["accuracy_per_layer"]
    assert len(per["ours_fused"]) == per["layers"] == 6


def test_report_reads_the_result(result):
    out, _ = result
    text = report.readme_results(out)
    assert "Skewed routing" in text and "Teacher-forced" in text and "| 12 |" in text
    assert (out / "prefill_cpu.png").exists() and (out / "prefill_cpu_layers.png").exists()
    assert f"{out.name}/prefill_cpu_layers.png" in text
    assert (out / "prefill_cpu_families.png").exists() and f"{out.name}/prefill_cpu_families.png" in text
    assert "GPU time by family" in text and "| 12 | fused + PCG |" in text and "| 12 | fused eager |" in text


def test_bad_arguments_are_clear_errors(capsys):
    with pytest.raises(SystemExit):
        prefill.main(["--parts", "eager,banana"])
    assert "unknown parts" in capsys.readouterr().err


def test_a_run_cut_short_leaves_what_it_measured(tmp_path, monkeypatch):
    """A run that dies in the compile peers (minutes in, on a device with a time budget) still leaves the columns
    measured before, in a file marked incomplete outside the README's glob; a complete run removes it."""
    def cut(*_, **__):
        raise RuntimeError("device budget spent")

    monkeypatch.setattr(prefill, "_compile_columns", cut)
    argv = ["--device", "cpu", "--preset", "tiny", "--tokens", "12", "--parts", "eager,hf_compile", "--rep-ms", "5",
            "--dtype", "float32", "--out", str(tmp_path)]
    with pytest.raises(RuntimeError, match="budget"):
        prefill.main(argv)
    doc = measure.read_json(tmp_path / "runs" / "prefill_cpu_partial.json")
    assert doc["complete"] is False and doc["rows"]["12"]["eager_ms"] > 0
    assert not (tmp_path / "prefill_cpu.json").exists()
    monkeypatch.undo()
    assert prefill.main(argv[:7] + ["eager"] + argv[8:]) == 0
    assert measure.read_json(tmp_path / "prefill_cpu.json")["complete"] is True
    assert not (tmp_path / "runs" / "prefill_cpu_partial.json").exists()


def test_fp8_experts_column_with_its_own_floor_and_per_layer_error(result):
    """The FP8 part (run last: it quantises the model in place): fused + PCG timed against the FP8 floor, whose
    weight bytes are the bf16 ones less half the experts', and every layer's teacher-forced FP8 error beside the
    unquantised model's own."""
    _, doc = result
    for r in doc["rows"].values():
        for col in ("pcg_fp8", "pcg_fp8a8"):  # FP8 weights; FP8 weights and activations (FP8 × FP8)
            assert r[f"{col}_ms"] > 0 and r[f"{col}_x_fp8_floor"] == r[f"{col}_ms"] / r["fp8_floor_ms"]
        assert r["fp8_weight_bytes"] < r["weight_bytes"]
    assert "FP8" in doc["fp8"]["quantization"] and doc["fp8"]["expert_bytes_after"] < doc["fp8"]["expert_bytes_before"]
    per = doc["accuracy_per_layer"]
    assert len(per["ours_fused_fp8"]) == per["layers"]
    assert per["ours_fused_fp8_median"] > 10 * per["ours_fused_median"]  # the quantisation shows, fp32 rounding not
    assert len(per["ours_fused_fp8a8"]) == per["layers"]
    assert per["ours_fused_fp8a8_median"] > per["ours_fused_fp8_median"]  # activations quantised too: more error


def test_one_layer_is_measured_as_the_model_runs_it(result):
    """Fused, a layer's normed input comes from the previous layer's epilogue (next_norm): the one-layer part must
    not count the unfused input norm (its pow/mean kernels) that only the first layer of a forward runs; unfused,
    the layer norms its own input. At 12 tokens the fused layer's projections are dense_gemm launches."""
    _, doc = result
    entry = doc["layer"]["12"]
    fused, unfused = dict(entry["fused_top_kernels"]), dict(entry["unfused_top_kernels"])
    assert "aten::pow" in unfused and "aten::pow" not in fused
    assert fused.get("gemma4lab::dense_gemm") == 4 and entry["fused_launches"] < entry["unfused_launches"]
