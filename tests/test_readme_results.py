"""The README's results tables are the report generated from results/*.json, not numbers typed by hand."""

from __future__ import annotations

from pathlib import Path

from gemma4lab.lab.report import attention_table, kernels_table, prefill_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_match_recorded_results():
    readme = (ROOT / "README.md").read_text()
    tables = {"prefill_": prefill_table, "kernels_": kernels_table, "attention_": attention_table}
    files = [p for prefix in tables for p in sorted((ROOT / "results").glob(f"{prefix}*.json"))]
    assert files, "no recorded results"
    for path in files:
        table = next(fn for prefix, fn in tables.items() if path.name.startswith(prefix))(path)
        assert table.strip() in readme, f"README table out of date for {path.name}: run python -m gemma4lab.report"
    for png in sorted((ROOT / "results").glob("prefill_*.png")) + sorted((ROOT / "results").glob("attention_*.png")):
        assert f"results/{png.name}" in readme
