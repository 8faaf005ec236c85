"""The README's results section is the report generated from results/*.json, not numbers typed by hand."""

from __future__ import annotations

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
