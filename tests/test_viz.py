"""gemma4lab.lab.viz: every notebook figure from small synthetic data and from the recorded results in the repo.

The notebooks only call these functions, so a figure that breaks fails here in milliseconds, not after a notebook run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from gemma4lab.lab import measure, notebook, viz

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
ENV = {"card": "TestCard X1", "torch": "9.9", "triton": "8.8", "date_utc": "2031-02-03T04:05:06+00:00"}
LABEL = "TestCard X1 · torch 9.9 · triton 8.8 · 2031-02-03"


def _doc(**payload):
    return {"producer": measure.PRODUCER, "environment": ENV, **payload}


def _pcg_doc():
    rows = {str(t): {"tokens": t, "eager_unfused_ms": 30.0, "eager_fused_ms": 20.0, "pcg_fused_ms": 5.0 + t / 100}
            for t in (16, 93, 1453)}  # fmt: skip
    rows["93"]["pcg_fused_ms"] = None  # a missing measurement is skipped, not plotted as 0
    prof = {"cpu_dispatch_ms": 10.0, "gpu_busy_ms": 6.0, "kernels": 1100, "wall_ms": 120.0}
    profiles = {f"{name}_{t}": prof for name in ("eager_unfused", "pcg_fused") for t in (93, 1453)}
    return _doc(rows=rows, profiles=profiles, layers=6)


def _title(fig: Figure) -> str:
    return " ".join(ax.get_title() for ax in fig.axes)


def _recorded(kind: str):
    rec = viz.load_recorded(kind, RESULTS)
    if rec is None:
        pytest.skip(f"no results/{kind}_*.json in this checkout")
    return rec


# ------------------------------------------------------------------------------------------------ notebook_setup


def test_notebook_setup_cpu_sets_interpreter_and_finds_root(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert notebook.setup("cpu", start=tmp_path / "notebooks") == tmp_path
    assert os.environ["TRITON_INTERPRET"] == "1"


def test_notebook_setup_cuda_leaves_interpreter_alone(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.chdir(tmp_path)
    assert notebook.setup("cuda") == tmp_path
    assert notebook.setup("cuda:1") == tmp_path
    assert "TRITON_INTERPRET" not in os.environ


def test_notebook_setup_respects_an_explicit_interpreter_setting(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    notebook.setup("cpu", start=tmp_path)
    assert os.environ["TRITON_INTERPRET"] == "0"


# ids avoid the bare word "gpu": conftest skips tests with that keyword on machines without one
@pytest.mark.parametrize("device", ["gpu", "CUDA", "", "cuda:x", "mps", None], ids=lambda d: f"device={d!r}")
def test_notebook_setup_rejects_unknown_device(device, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="unknown DEVICE"):
        notebook.setup(device)
    assert "TRITON_INTERPRET" not in os.environ


def test_notebook_setup_falls_back_to_the_checkout(tmp_path):
    assert notebook.setup("cuda", start=tmp_path) == ROOT  # no pyproject above tmp_path: the package's checkout


def test_importing_viz_does_not_import_the_kernels():
    """notebook_setup must run before Triton decorates the kernels, so importing viz may not pull them in."""
    code = ("import sys, gemma4lab.lab.viz, gemma4lab.lab.notebook; "
            "print(sorted(m for m in ('triton', 'gemma4lab.kernels') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------ load_recorded


def test_load_recorded_missing_returns_none(tmp_path):
    assert viz.load_recorded("pcg", tmp_path) is None
    assert viz.load_recorded("pcg", tmp_path / "does-not-exist") is None


def test_load_recorded_skips_foreign_and_broken_files(tmp_path):
    (tmp_path / "pcg_a.json").write_text("{not json")
    (tmp_path / "pcg_b.json").write_text(json.dumps({"rows": {}}))  # no gemma4lab producer
    assert viz.load_recorded("pcg", tmp_path) is None
    (tmp_path / "pcg_c.json").write_text(json.dumps(_pcg_doc()))
    (tmp_path / "kernels_z.json").write_text(json.dumps(_doc(results=[])))
    doc, label = viz.load_recorded("pcg", tmp_path)
    assert doc["layers"] == 6 and label == LABEL


def test_env_label_without_environment():
    assert viz.env_label({}) == "? · torch ? · triton ? · ?"


@pytest.mark.parametrize("kind", ["pcg", "kernels", "prefill"])
def test_load_recorded_real_results(kind):
    doc, label = _recorded(kind)
    e = doc["environment"]
    assert label == f"{e['card']} · torch {e['torch']} · triton {e['triton']} · {e['date_utc'][:10]}"


# ------------------------------------------------------------------------------------------------ figures


def test_plot_photo_tokens():
    fig = viz.plot_photo_tokens(Image.new("RGB", (40, 30)), 12)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert fig.axes[0].get_title() == "40×30 px → 12 soft tokens"


def test_plot_prompt_tokens_labels_each_run():
    ids = np.array([[2, 10, 7, 9, 9, 9, 8, 11]])  # text ×2, boi, image ×3, eoi, text
    fig = viz.plot_prompt_tokens(Image.new("RGB", (8, 8)), ids, image_token_id=9, boi_token_id=7, eoi_token_id=8)
    strip = fig.axes[1]
    assert [round(p.get_width()) for p in strip.patches] == [2, 1, 3, 1, 1]
    assert sorted(t.get_text() for t in strip.texts) == sorted(["text ×2", "boi", "image ×3", "eoi", "text"])
    assert "3 image soft tokens" in strip.get_title()


def test_plot_error_histograms_uses_the_first_rows():
    rng = np.random.default_rng(0)
    errors = {"one rounding": rng.uniform(1e-6, 1e-3, 8 * 4), "many": rng.uniform(1e-5, 1e-2, 8 * 4)}
    fig = viz.plot_error_histograms(errors, rows=2, hidden=4)
    (ax,) = fig.axes
    assert len(ax.containers) == 2 and len(ax.get_lines()) == 1  # two histograms and the half-ulp line
    assert sum(p.get_height() for p in ax.containers[0]) == 2 * 4
    assert ax.get_title() == "RMSNorm in bf16, 2 rows × 4"


def test_plot_traffic():
    (ax,) = viz.plot_traffic(16.9, 78.8).axes
    assert [p.get_width() for p in ax.patches] == [16.9, 78.8]


def test_plot_roofline_synthetic():
    doc = _doc(results=[{"kernel": "rmsnorm_residual_scalar", "tokens": t, "eager_frac_copy": 0.1,
                         "triton_frac_copy": 0.5, "graph_frac_copy": None} for t in (1024, 93)]
                       + [{"kernel": "other", "tokens": 1, "eager_frac_copy": 0.9}])  # fmt: skip
    rows = viz.kernel_rows(doc, "gemma_rmsnorm_residual_scalar")
    assert [r["tokens"] for r in rows] == [93, 1024]
    fig = viz.plot_roofline(rows, "gemma_rmsnorm_residual_scalar", viz.env_label(doc))
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.get_lines()[:2]] == ["eager", "triton"]
    assert len(ax.get_lines()) == 3  # two series and the roof
    assert LABEL in ax.get_title()


def test_plot_roofline_real_results():
    doc, label = _recorded("kernels")
    rows = viz.kernel_rows(doc, "gemma_rmsnorm_residual_scalar")
    assert rows, "the notebook's kernel must be in the recorded results, or 02 plots nothing"
    (ax,) = viz.plot_roofline(rows, "gemma_rmsnorm_residual_scalar", label).axes
    assert len(ax.get_lines()) >= 2 and doc["environment"]["card"] in ax.get_title()


def test_plot_error_bars():
    (ax,) = viz.plot_error_bars({"unfused chain": (1e-2, 5e-2), "fused kernel": (1e-3, 4e-3)}, "t").axes
    assert len(ax.patches) == 4
    assert [t.get_text() for t in ax.get_xticklabels()] == ["unfused chain", "fused kernel"]


@pytest.mark.parametrize(("device", "ylabel"), [("cpu", "ATen ops per layer (launch proxy)"),
                                                ("cuda", "kernels per layer")])  # fmt: skip
def test_plot_launches(device, ylabel):
    per_layer = {"transformers": 50.0, "unfused": 40.0, "epilogue": 35.0, "all": 30.0}
    (ax,) = viz.plot_launches(per_layer, device, 8).axes
    assert len(ax.patches) == 4 and ax.get_xlabel() == ylabel  # horizontal bars: the count is on x
    assert [t.get_text() for t in ax.get_yticklabels()] == list(per_layer)
    assert [p.get_width() for p in ax.patches] == list(per_layer.values())
    assert ax.get_title() == f"tiny model, 8 tokens, {device}"


def test_plot_pcg_latency_synthetic():
    (ax,) = viz.plot_pcg_latency(_pcg_doc(), LABEL).axes
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["eager, unfused", "eager, fused", "fused + PCG"]
    assert list(lines[2].get_xdata()) == [16, 1453]  # the None at 93 is left out
    assert ax.get_title() == LABEL


def test_plot_pcg_latency_real_results():
    doc, label = _recorded("pcg")
    (ax,) = viz.plot_pcg_latency(doc, label).axes
    assert len(ax.get_lines()) == 3 and doc["environment"]["date_utc"][:10] in ax.get_title()


def test_breakdown_data_and_plot():
    data = viz.breakdown_data(_pcg_doc())
    assert sorted(data) == [93, 1453] and sorted(data[93]) == ["eager_unfused", "pcg_fused"]
    assert data[93]["eager_unfused"]["latency_ms"] == 30.0
    assert data[93]["eager_unfused"]["idle_ms"] == 30.0 - data[93]["eager_unfused"]["gpu_busy_ms"]
    assert data[93]["pcg_fused"]["latency_ms"] is None  # the row's own (missing) value, not the profile's wall time
    assert data[93]["pcg_fused"]["idle_ms"] is None
    assert viz.breakdown_data(None) == {} and viz.breakdown_data(_doc(rows={})) == {}
    fig = viz.plot_breakdown(data[93], 93, LABEL)
    (ax,) = fig.axes
    assert len(ax.patches) == 3 * 2  # busy, idle, dispatch × two implementations
    assert ax.get_title() == f"T = 93 tokens — {LABEL}"
    assert "1100 kernels" in ax.get_xticklabels()[0].get_text()


def test_breakdown_data_real_results():
    doc, label = _recorded("pcg")
    data = viz.breakdown_data(doc)
    t = min(data)
    (ax,) = viz.plot_breakdown(data[t], t, label).axes
    assert len(ax.patches) == 3 * len(data[t]) and label in ax.get_title()


def test_plot_breakdown_live():
    (ax,) = viz.plot_breakdown({"live": {"cpu_dispatch_ms": 3.0, "gpu_busy_ms": 0.0, "latency_ms": 4.0,
                                         "idle_ms": 4.0, "kernels": 500}}, 16, "live on cpu").axes  # fmt: skip
    assert len(ax.patches) == 3


def test_plot_padding_waste():
    (ax,) = viz.plot_padding_waste([1, 2, 3, 4], [0.75, 0.5, 0.25, 0.0]).axes
    assert len(ax.get_lines()) == 1 and ax.get_xscale() == "log"


PUBLISHED = {93: (35.6, 16.5), 1453: (36.3, 25.1)}


def test_plot_prefill_published_only():
    (ax,) = viz.plot_prefill(PUBLISHED, [], None).axes
    assert len(ax.get_lines()) == 2 and "(published only)" in ax.get_title()


def test_plot_prefill_synthetic():
    rows = [{"tokens": 1453, "eager_ms": 90.0, "pcg_ms": 40.0, "hf_ms": float("nan")},
            {"tokens": 93, "eager_ms": 80.0, "pcg_ms": 20.0, "hf_ms": "oom"}]  # fmt: skip
    ax, speedup = viz.plot_prefill(PUBLISHED, rows, LABEL).axes
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["published baseline", "published fused + PCG", "ours, unfused eager", "ours, fused + PCG",
                      "transformers"]
    assert list(ax.get_lines()[2].get_xdata()) == [93, 1453]
    assert LABEL in ax.get_title()
    vs_published = speedup.get_lines()[0]  # published fused + PCG / ours at the token counts both have
    assert list(vs_published.get_xdata()) == [93, 1453]
    assert list(vs_published.get_ydata()) == pytest.approx([16.5 / 20.0, 25.1 / 40.0])
    assert ax.get_legend() is None  # the legend sits below the axes, over no point


def test_plot_prefill_real_results():
    doc, label = _recorded("prefill")
    ax, _ = viz.plot_prefill(PUBLISHED, list(doc["rows"].values()), label).axes
    assert len(ax.get_lines()) > 2 and doc["environment"]["card"] in ax.get_title()


def test_figures_do_not_touch_pyplot():
    """Figures are returned, not registered with pyplot: nothing is shown twice or leaks between notebook cells."""
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    viz.plot_pcg_latency(_pcg_doc(), LABEL)
    assert plt.get_fignums() == before


def _family_rows():
    from gemma4lab.lab.floors import FAMILIES

    def prof(scale):
        fams = {f: {"gpu_ms": scale * (i + 1), "floor_ms": scale * (i + 1) / 2} for i, f in enumerate(FAMILIES)}
        busy = sum(v["gpu_ms"] for v in fams.values())
        return {**fams, "busy_ms": busy, "idle_ms": 4.0, "wall_ms": busy + 4.0, "op_floor_ms": busy / 2}

    return [{"tokens": 1453, "families": prof(2.0)}, {"tokens": 93, "families": prof(1.0)},
            {"tokens": 189, "families": None}]  # fmt: skip  (not profiled: left out)


def test_plot_families_synthetic():
    from gemma4lab.lab.report import FAMILY_LABELS

    fig = viz.plot_families(_family_rows(), LABEL)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["93 tokens", "1453 tokens"]
    ours, floor = [], []
    for ax in axes:
        assert len(ax.patches) == 2 * len(FAMILY_LABELS) + 1  # every family twice, and the idle time
        ours.append(max(p.get_y() + p.get_height() for p in ax.patches if p.get_x() < 0.5))
        floor.append(max(p.get_y() + p.get_height() for p in ax.patches if p.get_x() > 0.5))
    assert ours == [21.0 + 4.0, 42.0 + 4.0]  # GPU time of every family, then idle: the latency
    assert floor == [10.5, 21.0]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [*FAMILY_LABELS.values(), "GPU idle"] and LABEL in fig.texts[0].get_text()


def test_plot_families_without_profiles():
    (ax,) = viz.plot_families([{"tokens": 93}], LABEL).axes
    assert not ax.patches and "no profile" in ax.texts[0].get_text()


def test_plot_pcg_speedup_divides_by_the_pcg_row_of_the_same_count():
    doc = {"rows": {"16": {"tokens": 16, "eager_fused_ms": 8.0, "eager_unfused_ms": 12.0, "pcg_fused_ms": 2.0},
                    "93": {"tokens": 93, "eager_fused_ms": 9.0, "pcg_fused_ms": 3.0},
                    "512": {"tokens": 512, "eager_fused_ms": 10.0}}}  # no PCG row: left out
    (ax,) = viz.plot_pcg_speedup(doc, LABEL).axes
    fused, unfused = ax.get_lines()[:2]
    assert list(fused.get_xdata()) == [16, 93] and list(fused.get_ydata()) == [4.0, 3.0]
    assert list(unfused.get_xdata()) == [16] and list(unfused.get_ydata()) == [6.0]


def test_decoder_layer_diagram_names_real_kernels():
    """The 00 diagram can't drift from the package: every kernel it names is a registered op, and it shows every
    prefill kernel of a MoE layer (all but the dense layers' single-norm epilogue, the epilogue without the next
    norm, used after the last layer, decode attention, the vision encoder's norm sandwich, and the few-row dense
    GEMM of decode and prompts of up to 16 tokens)."""
    from gemma4lab import kernels

    named = {op for *_, op in viz.DECODER_LAYER_STAGES if op}
    assert named <= set(kernels.OPS)
    assert set(kernels.OPS) - named == {"rmsnorm_residual_scalar", "dual_rmsnorm_residual_scalar",
                                        "decode_attention", "norm_residual_norm", "dense_gemm"}
    fig = viz.plot_decoder_layer()
    texts = {t.get_text().replace("\n", "") for t in fig.axes[0].texts}
    assert named <= texts and "GEMM" in texts


def _decode_doc(graphs: bool = True):
    mode = lambda ms: {"step_ms": ms, "loop_ms": ms * 1.1}  # noqa: E731
    rows = {f"{b}x{c}": {"batch": b, "context": c, "eager": mode(40.0), "graph": mode(3.0 + b / 8),
                         "floor_observed": {"floor_ms": 1.5 + b / 10}, "floor_expected": {"floor_ms": 1.5 + b / 9}}
            for b in (1, 4, 16) for c in (512, 16384)}
    del rows["16x16384"]["graph"]  # a point the runner refused: absent from its lines, not drawn as 0
    return _doc(rows=rows, preset="26b-a4b", layers=30, graphs=graphs)


def test_plot_decode_synthetic():
    fig = viz.plot_decode(_decode_doc(), LABEL)
    assert len(fig.axes) == 4 and "context 512" in _title(fig) and "context 16384" in _title(fig)
    top = fig.axes[1]  # ms per step at 16384 (axes are row-major: the top row first)
    lines = {ln.get_label(): ln for ln in top.get_lines()}
    assert set(lines) == {"eager step", "eager loop", "CUDA graph step", "CUDA graph loop", "floor (experts seen)",
                          "floor (random routing)"}
    assert list(lines["CUDA graph step"].get_xdata()) == [1, 4] and list(lines["eager step"].get_xdata()) == [1, 4, 16]
    rates = {ln.get_label(): ln for ln in fig.axes[3].get_lines()}
    assert list(rates["eager step"].get_ydata()) == pytest.approx([1 / 40 * 1e3, 4 / 40 * 1e3, 16 / 40 * 1e3])
    assert top.get_yscale() == "log"


def test_plot_decode_says_when_there_were_no_graphs():
    labels = [ln.get_label() for ln in viz.plot_decode(_decode_doc(graphs=False), LABEL).axes[0].get_lines()]
    assert "CUDA graph (no CUDA: eager fallback) step" in labels
    assert len(viz.plot_decode(_doc(rows={}), LABEL).axes) == 2


def test_plot_timeline_draws_each_kernel_where_it_ran():
    profiles = {"eager": {"timeline": [["a", "dense_gemm", 0.0, 100.0], ["b", "row_kernels", 400.0, 50.0]]},
                "PCG": {"timeline": [["a", "dense_gemm", 0.0, 100.0], ["b", "row_kernels", 102.0, 50.0]]}}
    (ax,) = viz.plot_timeline(profiles, LABEL).axes
    bars = sorted((round(b.x0, 4), round(b.width, 4), round((b.y0 + b.y1) / 2))
                  for c in ax.collections for b in (p.get_extents() for p in c.get_paths()))
    assert bars == [(0.0, 0.1, 0), (0.0, 0.1, 1), (0.102, 0.05, 1), (0.4, 0.05, 0)]  # ms, rows: eager 0, PCG 1
    assert [t.get_text() for t in ax.get_yticklabels()] == ["eager", "PCG"]
    texts = [t.get_text() for t in ax.texts]
    assert "2 kernels, busy 0.15 of 0.45 ms (67% idle)" in texts  # eager: a 250 µs gap
    assert "2 kernels, busy 0.15 of 0.15 ms (1% idle)" in texts  # PCG: a 2 µs gap
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"dense GEMM", "row kernels"}


def test_gap_widths_agree_with_the_profiling_rule_and_the_histogram_splits_them():
    from gemma4lab.lab.profiling import timeline_gaps

    tl = [["c", "row_kernels", 30.0, 1.0], ["a", "dense_gemm", 0.0, 10.0], ["b", "row_kernels", 10.5, 9.5],
          ["n", "row_kernels", 12.0, 2.0], ["d", "attention", 30.5, 9.5], ["e", "routing", 45.0, 5.0]]
    widths = viz.gap_widths_us({"timeline": tl})
    assert widths == [0.5, 10.0, 5.0]  # out of order in, an overlap and a nested kernel are no gap
    assert sum(widths) / 1e3 == pytest.approx(timeline_gaps((n, a, a + d) for n, _, a, d in tl)["sum_ms"])
    (ax,) = viz.plot_gaps({"PCG": {"timeline": tl}, "empty": {}}, LABEL).axes
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["PCG: 3 gaps, < 5 µs: 0.00 ms, wider: 0.01 ms", "empty: 0 gaps, < 5 µs: 0.00 ms, wider: 0.00 ms"]


def test_plot_moe_sweep_takes_each_tiles_best_setting():
    row = lambda t, skew, a, b: {"tokens": t, "skew": skew, "gemm_grouped_mm_ms": 0.5,  # noqa: E731
                                 "gemm": [{"config": "MoeConfig(block_m=16, block_n=128)", "ms": a},
                                          {"config": "MoeConfig(block_m=16, block_n=64)", "ms": a + 0.1},
                                          {"config": "MoeConfig(block_m=32, block_n=128)", "ms": b}]}
    doc = {"rows": [row(93, 1.0, 0.4, 0.6), row(189, 1.0, 0.5, 0.7), row(93, 3.0, 0.3, 0.35)]}
    fig = viz.plot_moe_sweep(doc, LABEL)
    uniform, skewed = fig.axes
    lines = {line.get_label(): list(line.get_ydata()) for line in uniform.get_lines()}
    assert lines == {"grouped_mm": [0.5, 0.5], "moe_gemm, 16-row tile": [0.4, 0.5], "moe_gemm, 32-row tile": [0.6, 0.7]}
    assert uniform.get_title() == "routing skew 1 (uniform)" and skewed.get_title() == "routing skew 3"
    swapped = {"rows": [{**row(93, 1.0, 0.4, 0.6), "gemm": [
        {"config": "MoeConfig(block_m=16, block_n=128, swap_ab=False)", "ms": 0.4},
        {"config": "MoeConfig(block_m=16, block_n=128, swap_ab=True)", "ms": 0.3}]}]}
    (ax,) = viz.plot_moe_sweep(swapped, LABEL).axes
    styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
    assert styles["moe_gemm, 16-row tile"] == "-" and styles["moe_gemm, 16-row tile, swapped (w·aᵀ)"] == "--"


def test_plot_attention_sweep_orders_and_hatches_the_predicted_spills():
    rec = lambda bm, dv, tf: {"layer": "full", "tokens": 11533, "block_m": bm, "block_n": 64,  # noqa: E731
                              "num_warps": 8, "num_stages": 1, "dv_splits": dv, "tflops": tf}
    doc = {"sweep": [rec(128, 1, 60.0), rec(128, 2, 240.0), rec(64, 1, 190.0),
                     {**rec(128, 1, 300.0), "layer": "sliding"}]}
    fig = viz.plot_attention_sweep(doc, LABEL, predicted_spill=lambda r: r["block_m"] * 512 // r["dv_splits"] > 32768)
    (ax,) = fig.axes
    bars = ax.patches
    assert [b.get_width() for b in bars] == [60.0, 190.0, 240.0]  # the full layer only, slowest at the bottom
    assert [b.get_hatch() for b in bars] == ["//", None, None]
    assert ax.get_yticklabels()[-1].get_text() == "128×64, 8 warps, 1 stage, dv_splits 2"


def test_kernel_lines_reads_each_kernels_rows_and_skips_incomplete_ones():
    doc = {"results": [{"kernel": "post_attention_block", "tokens": 93, "graph_ms": 0.0033, "graph_frac_copy": 0.23,
                        "eager_ms": 0.5},
                       {"kernel": "post_attention_block", "tokens": 189, "graph_ms": None},
                       {"kernel": "router_topk", "tokens": 93, "graph_ms": 0.002, "graph_frac_copy": 0.1,
                        "eager_ms": 0.02}]}
    lines = viz.kernel_lines(doc, ["gemma_post_attention_block"])
    assert len(lines) == 1 and "T=    93:     3.3 µs in a graph, 23% of copy bandwidth, 152x" in lines[0]


def _dense_doc(fixed_us=5.0, bw=4e12):
    """A dense sweep whose cuBLAS times lie exactly on ``fixed + bytes / bw``; the head is far off the line."""
    rows = [{"shape": f"w{i}", "rows": 1, "weight_bytes": mb * 1e6,
             "cublas_ms": (fixed_us + mb * 1e6 / bw * 1e6) / 1e3,
             "best": {"ms": (fixed_us / 2 + mb * 1e6 / bw * 1e6) / 1e3}}
            for i, mb in enumerate((6, 12, 23, 46))]
    rows.append({"shape": "head", "rows": 1, "weight_bytes": 1.5e9, "cublas_ms": 1.0, "best": None})
    return _doc(rows=rows, copy_bandwidth_Bps=bw)


def test_dense_fixed_cost_recovers_the_line_and_the_plot_shows_it():
    fit = viz.dense_fixed_cost(_dense_doc())
    assert abs(fit["fixed_us"] - 5.0) < 1e-6 and abs(fit["bandwidth_Bps"] / 4e12 - 1) < 1e-6 and fit["points"] == 4
    with pytest.raises(ValueError, match="at least two"):
        viz.dense_fixed_cost(_dense_doc(), rows=8)
    fig = viz.plot_dense_sweep(_dense_doc(), LABEL)
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert "cuBLAS (F.linear)" in labels and any(lb.startswith("cuBLAS fit: 5.0 µs") for lb in labels)
    assert len(fig.axes[0].lines[0].get_xdata()) == 4  # the 1.5 GB head is left out of the picture
