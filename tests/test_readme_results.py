"""The README's results tables are the report generated from results/*.json, not numbers typed by hand."""

from __future__ import annotations

from pathlib import Path

from gemma4lab.report import kernels_table, prefill_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_match_recorded_results():
    readme = (ROOT / "README.md").read_text()
    files = sorted((ROOT / "results").glob("prefill_*.json")) + sorted((ROOT / "results").glob("kernels_*.json"))
    assert files, "no recorded results"
    for path in files:
        table = prefill_table(path) if path.name.startswith("prefill_") else kernels_table(path)
        assert table.strip() in readme, f"README table out of date for {path.name}: run python -m gemma4lab.report"
    for png in sorted((ROOT / "results").glob("prefill_*.png")):
        assert f"results/{png.name}" in readme
