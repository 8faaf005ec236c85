"""The README's results section is the report generated from results/*.json, not numbers typed by hand."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gemma4lab.lab import report

ROOT = Path(__file__).resolve().parents[1]


def test_readme_results_section_is_generated_from_results():
    readme = (ROOT / "README.md").read_text()
    want = report.readme_results(ROOT / "results")
    assert want in readme, "README results section is stale: run `python -m gemma4lab.lab.report --readme`"
    assert readme.count(report.BEGIN) == 1 and readme.count(report.END) == 1


def test_readme_shows_every_recorded_figure():
    readme = (ROOT / "README.md").read_text()
    for png in sorted((ROOT / "results").glob("*.png")):
        assert f"results/{png.name}" in readme, f"{png.name} is recorded but not shown in the README"


def test_hand_written_readme_prose_holds_no_measured_figures():
    """Outside the generated section, the README may name cards and commands but quote no timings or ratios."""
    import re

    readme = (ROOT / "README.md").read_text()
    outside = readme[: readme.index(report.BEGIN)] + readme[readme.index(report.END):]
    figures = re.findall(r"\b\d+(?:\.\d+)?\s?(?:ms|µs|us|×|x faster|TB/s|GB/s|TFLOP/s|GiB|%)", outside)
    assert not figures, f"measured figures typed by hand in the README: {figures}"


def test_splice_needs_the_markers():
    with pytest.raises(ValueError, match="marker"):
        report.splice("no markers here", "x")
    text = f"a\n{report.BEGIN}\nold\n{report.END}\nb"
    assert report.splice(text, "NEW") == "a\nNEW\nb"


def test_report_cli_refuses_a_missing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path / "nope")])
    assert e.value.code == 2 and "not a directory" in capsys.readouterr().err


def test_report_tolerates_partial_and_nan_results(tmp_path):
    from gemma4lab.lab import measure

    measure.write_json(tmp_path / "prefill_x.json", {"benchmark": "prefill", "rows": {
        "93": {"tokens": 93, "floor_ms": 10.0, "pcg_ms": float("nan"), "hf_ms": 20.0}}})
    measure.write_json(tmp_path / "kernels_x.json", {"benchmark": "kernels", "results": [
        {"kernel": "k", "tokens": 93, "triton_ms": None}]})
    out = report.readme_results(tmp_path)
    assert "| 93 |" in out and "20.0" in out


def test_families_table_puts_ours_beside_each_familys_floor():
    floors = {"expert_gemm": 11.5, "dense_gemm": 1.25, "attention": 0.02, "routing": 0.04, "row_kernels": 0.1,
              "other": 0.0}  # fmt: skip
    prof = {**{f: {"gpu_ms": 2 * v + 0.5, "floor_ms": v} for f, v in floors.items()}, "idle_ms": 3.25,
            "wall_ms": 33.0, "busy_ms": 29.75, "op_floor_ms": 12.91}
    doc = {"rows": {"93": {"tokens": 93, "floor_ms": 12.6, "op_floor_ms": 12.91, "op_floor_by_family_ms": floors,
                           "families": prof},
                    "189": {"tokens": 189, "floor_ms": 12.7, "op_floor_ms": 13.0, "op_floor_by_family_ms": floors},
                    "7": {"tokens": 7, "floor_ms": 1.0}}}  # fmt: skip  (an older file: no op-level floor)
    lines = report.families_table(doc).splitlines()
    assert len(lines) == 2 + 2 and "expert GEMM (ours / floor)" in lines[0]
    assert lines[2] == ("| 93 | fused + PCG | 12.91 | 23.50 / 11.50 | 3.00 / 1.25 | 0.54 / 0.02 | 0.58 / 0.04 | "
                        "0.70 / 0.10 | 0.50 / 0.00 | 3.25 | 33.00 |")
    assert lines[3].startswith("| 189 | — | 13.00 | — / 11.50 |") and lines[3].endswith("| — | — |")
    assert "GPU time by family" not in report.prefill_section({"rows": {"7": doc["rows"]["7"]}}, None)


def _decode_doc() -> dict:
    """Two points of a decode run on a GPU: one measured, one the runner refused."""
    stats = {"median_ms": 4.0, "min_ms": 3.9, "max_ms": 4.4, "q20_ms": 3.9, "q80_ms": 4.1, "runs": 5}
    mode = lambda step, loop: {"step_ms": step, "loop_ms": loop, "host_ms": loop - step,  # noqa: E731
                               "tokens_per_s": 8 / loop * 1e3, "step_tokens_per_s": 8 / step * 1e3,
                               "x_floor": step / 2.0, "loop_x_floor": loop / 2.0, "step_stats": stats,
                               "loop_stats": stats}
    floor = lambda ms, kv: {"floor_ms": ms, "kv_bytes": kv, "kv_bytes_as_cached": 2 * kv, "bytes": 8e9}  # noqa
    return {"benchmark": "decode", "preset": "26b-a4b", "layers": 30, "dtype": "bfloat16", "fusion": "all",
            "steps": 32, "runs": 5, "graphs": True, "copy_bandwidth_Bps": 4.0e12, "routing": {"exponent": 0.0},
            "contexts_run": {"4096": {"capture_s": 2.5}},
            "rows": {"8x4096": {"batch": 8, "context": 4096, "experts_expected": 50.25, "experts_observed": 49.5,
                                "floor_expected": floor(2.02, 1e9), "floor_observed": floor(2.0, 1e9),
                                "floor_basis": "observed", "floor_ms": 2.0, "eager": mode(40.0, 41.0),
                                "graph": {**mode(4.0, 4.5), "replay_ms": 3.6, "replay_x_floor": 1.8},
                                "tokens_equal": True, "first_mismatch": None,
                                "graph_speedup_step": 10.0, "graph_speedup_loop": 41.0 / 4.5},
                     "16x4096": {"batch": 16, "context": 4096, "experts_expected": 82.4,
                                 "floor_expected": floor(3.5, 2e9), "floor_basis": "expected", "floor_ms": 3.5,
                                 "unsupported": {"eager": "ValueError: too long", "graph": "ValueError: too long"}}}}


def test_decode_table_and_findings_from_a_synthetic_run():
    doc = _decode_doc()
    lines = report.decode_table(doc).splitlines()
    assert len(lines) == 4 and "CUDA graph ms: step / loop" in lines[0]
    assert lines[2] == ("| 4096 | 8 | 49.5 · 50.2 | 2.00 · 2.02 | 40.00 / 41.00 | 4.00 / 4.50 | 3.60 (1.80×) "
                        "| 2000 / 1778 | 2.00× | yes |")
    assert lines[3] == "| 4096 | 16 | — · 82.4 | — · 3.50 | unsupported | unsupported | — | — / — | — | — |"
    text = "\n".join(report.decode_findings(doc))
    assert "(eager ÷ graph): 10.00× in device time per step, 9.11× in loop time" in text
    assert "500 µs per step, 11 % of the loop" in text and "at 1 of 1 points." in text
    assert "**The replay alone** (steps queued back to back, so no host time is in it): 1.80× the floor; the step " \
        "in the loop takes 1.11× of it" in text
    assert "eager and graph not supported** at batch × context 16×4096 (recorded, not timed): ValueError: too long" \
        in text
    assert "No CUDA graphs" not in text and "Capture**: 2.5 s" in text


def test_the_gaps_of_a_profile_read_as_one_phrase():
    gaps = {"sum_ms": 0.31, "count": 668, "largest": [[2.1, "_dense_gemm_kernel", "_qkv_norm_rope_kernel"]]}
    assert report.gaps_phrase(gaps) == ("; in one profiled call, gaps between kernels 0.31 ms in 668, the widest 2 µs "
                                        "between _dense_gemm_kernel and _qkv_norm_rope_kernel")
    # after a copy the host queued (a graph runner's inputs): the host's time, which the profiler stretches
    gaps["largest"] = [[759.0, "Memcpy DtoD", "void elementwise_kernel_with_index"]]
    assert report.gaps_phrase(gaps).endswith("the widest 759 µs between Memcpy DtoD and void "
                                             "elementwise_kernel_with_index (host time: the profiler slows it)")
    assert report.gaps_phrase({"sum_ms": 0.0, "count": 0, "largest": []}) == ""
    assert report.gaps_phrase(None) == ""


def test_readme_shows_decode_only_when_a_decode_run_exists(tmp_path):
    from gemma4lab.lab import measure

    measure.write_json(tmp_path / "prefill_x.json", {"benchmark": "prefill", "rows": {}})
    assert "### Decode" not in report.readme_results(tmp_path)
    measure.write_json(tmp_path / "decode_x.json", _decode_doc())
    text = report.readme_results(tmp_path)
    assert "### Decode" in text and "| 4096 | 8 |" in text and "![decode]" not in text  # no figure drawn yet


def test_kernels_section_compares_with_the_published_layout():
    """The published-layout finding reads its ratios from the results, and names the T where ours is behind."""
    from gemma4lab.lab import report

    rows = [{"kernel": "rmsnorm_residual_scalar", "tokens": t, "graph_vs_published": v}
            for t, v in ((93, 0.9), (2893, 1.2), (32768, 1.05))]
    rows.append({"kernel": "router_topk", "tokens": 93})
    text = report.kernels_section({"results": rows, "roofs": {}, "environment": {"card": "X"}}, None)
    assert ("rmsnorm_residual_scalar against the published layout (one program per row, "
            "`lab/bench/published_layout.py`), both in a CUDA graph: 0.90–1.20× (slower at T = 93).") in text
    assert "router_topk against" not in text


def test_a_tagged_run_of_some_parts_gets_its_own_section(tmp_path):
    """``bench-prefill --tag`` writes beside the full run; the README keeps the full run's section and adds one
    for the tagged run, named by its tag and parts, with its own provenance, and an FP8 cell reads against the
    FP8 floor."""
    from gemma4lab.lab import measure

    row = {"tokens": 93, "floor_ms": 10.0, "pcg_ms": 15.0}
    measure.write_json(tmp_path / "prefill_x.json", {"benchmark": "prefill", "rows": {"93": row}})
    fp8 = {**row, "pcg_ms": 16.0, "pcg_fp8_ms": 13.0, "fp8_floor_ms": 6.5}
    measure.write_json(tmp_path / "prefill_x_fp8.json", {"benchmark": "prefill", "tag": "fp8",
                                                        "parts": ["pcg", "fp8"], "rows": {"93": fp8}})
    text = report.readme_results(tmp_path)
    assert text.count("### Prefill") == 2
    assert "`bench-prefill --tag fp8 --parts pcg,fp8`" in text
    assert "| 15.0 · 1.5× |" in text and "| 13.0 · 2.0× |" in text  # FP8 against its own floor, 13 / 6.5
    assert "1.23× the speed of the bf16 experts" in text


def test_bench_prefill_tag_must_be_a_plain_name():
    from gemma4lab.lab.bench.prefill import main

    with pytest.raises(SystemExit):
        main(["--tag", "../x", "--device", "cpu", "--preset", "tiny"])


def test_decode_findings_say_where_a_graph_step_goes():
    doc = _decode_doc()
    doc["rows"]["8x4096"]["graph_profile"] = {
        "families_ms": {"expert_gemm": 0.5, "dense_gemm": 1.25, "attention": 0.25, "routing": 0.0,
                        "row_kernels": 0.5, "other": 0.0}, "busy_ms": 2.5, "idle_ms": 1.5, "wall_ms": 4.0,
        "kernels": 512}
    text = "\n".join(report.decode_findings(doc))
    assert ("**Where a graph step goes** (batch 8 × 4096, one profiled step): 512 kernels; GPU time dense GEMM "
            "1.25 ms, expert GEMM 0.50 ms, row kernels 0.50 ms, attention 0.25 ms; idle 1.50 ms of 4.00 ms.") in text
    # captured on two streams (Fusion.branches): the family sums overlap, and the line says why
    doc["rows"]["8x4096"]["graph"]["branches"] = True
    text = "\n".join(report.decode_findings(doc))
    assert ("idle 1.50 ms of 4.00 ms — the dense MLP runs on a second stream beside the experts: the families "
            "overlap") in text


def test_attention_section_states_the_sweeps_end_to_end_effect():
    """``bench-attention --sweep`` times a whole prefill under the default and the sweep's fastest tiles; the
    section says both, the tiles and the ratio, all from the file."""
    from gemma4lab.lab.bench.attention import best_swept

    sweep = [{"layer": "full", "ms": 2.0, "block_m": 64, "block_n": 32, "num_warps": 8, "num_stages": 2,
              "dv_splits": 1, "tma": True},
             {"layer": "full", "ms": 3.0, "block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 1,
              "dv_splits": 2, "tma": False},
             {"layer": "full", "error": "OutOfResources"}]
    best = best_swept(sweep, "full")
    assert (best.block_m, best.tma) == (64, True) and best_swept(sweep, "sliding") is None
    doc = {"rows": [], "matmul_tflops": 700.0,
           "end_to_end": {"tokens": 11533, "layers": 6, "full_layers": 1, "speedup": 1.25,
                          "best": {"full": dataclasses.asdict(best), "sliding": None},
                          "default": {"median_ms": 50.0}, "swept_best": {"median_ms": 40.0}}}
    text = report.attention_section(doc, None)
    assert "50.0 ms" in text and "40.0 ms" in text and "64×32, 8 warps, 2 stages, TMA" in text and "1.25×" in text
    failed = report.attention_section({"rows": [], "end_to_end_error": "ValueError: out of memory"}, None)
    assert "not measured — ValueError: out of memory" in failed
    # a later sweep run supplies the figure a full run lacks, with its own provenance; when the fastest tiles are
    # the defaults the ratio is called what it is
    later = {**doc, "config_full": dataclasses.asdict(best), "environment": {"git_commit": "abc1234"}}
    text = report.attention_section({"rows": []}, None, later)
    assert "a later run:" in text and "abc1234" in text and "run-to-run spread" in text
    assert "run-to-run spread" not in report.attention_section(doc, None)
