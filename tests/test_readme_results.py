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
