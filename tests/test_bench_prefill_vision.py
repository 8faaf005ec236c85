"""bench-prefill's vision part on the tiny config on CPU: the tower alone (ours fused, unfused, graphed, and
transformers' on the same weights), the whole image prompt (fused eager and through the PCG runner), both floors, and
the README table made of them. Its own module so that its minute-long fixture runs beside the other parts'."""

from __future__ import annotations

import pytest

from gemma4lab.lab import measure, report
from gemma4lab.lab.bench import prefill
from gemma4lab.lab.floors import FAMILIES


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_vision")
    argv = ["--device", "cpu", "--preset", "tiny", "--tokens", "12", "--parts", "vision", "--rep-ms", "5",
            "--images", "1", "--image-soft-tokens", "70", "--dtype", "float32", "--out", str(out)]
    assert prefill.main(argv) == 0
    return out, measure.read_json(out / "prefill_cpu.json")


def test_vision_part_per_image_count(result):
    """The tower alone (ours and transformers' on the same weights), the whole prompt, the tower's kernels and both
    floors (one image count here: each is one pass of the same loop, and the fused tower under the interpreter costs
    ~25 s an extra image); two images of the same photo double the tower floor's work but not its weights."""
    from gemma4lab.lab.floors import vision_floor
    from gemma4lab.model.config import Gemma4Config

    _, doc = result
    r = doc["vision"]["1"]
    assert sorted(doc["vision"]) == ["1"]
    bw, rate = doc["copy_bandwidth_Bps"], doc["matmul_flops"]
    cfg = Gemma4Config.preset("tiny")
    one = vision_floor(cfg, r["patches"], bw, rate)
    two = vision_floor(cfg, r["patches"] * 2, bw, rate)
    assert one == r["tower_floor"]
    assert two["flops"] == 2 * one["flops"] and two["weight_bytes"] == one["weight_bytes"]
    assert r["tower"]["runs"] >= 3 and r["hf_tower"]["runs"] >= 3 and r["prompt_fused"]["runs"] >= 3
    assert r["tower_x_floor"] == r["tower"]["median_ms"] / r["tower_floor"]["floor_ms"]
    assert r["tower_kernels"] > 0 and r["text_floor_ms"] > 0
    # the whole prompt, fused eager and fused + PCG (eager pieces on CPU), each against text + tower floor; the PCG
    # prompt's logits beside the eager one's (fp32 here: rounding apart at most)
    assert r["prompt_pcg"]["runs"] >= 3 and r["prompt_pcg_bucket"] >= r["tokens"]
    prompt_floor = r["tower_floor"]["floor_ms"] + r["text_floor_ms"]
    assert r["prompt_x_floor"] == r["prompt_pcg"]["median_ms"] / prompt_floor
    assert r["prompt_fused_x_floor"] == r["prompt_fused"]["median_ms"] / prompt_floor
    assert 0 <= r["prompt_pcg_vs_eager_rel"] < 1e-5
    # the graphed tower (eager on CPU: no graphs to capture) gives the same soft tokens, and its time by family
    assert r["tower_graph"]["runs"] >= 3 and r["tower_graph_equal"] is True
    # the unfused encoder timed beside the fused one: the fused switches reach the tower (15 ops an encoder layer
    # against 78 on the CPU profile; the tiny tower's embedding, pooling and projector are the same in both), and
    # the two agree to fp32 rounding
    assert r["tower_unfused"]["runs"] >= 3 and r["tower_kernels"] < r["tower_unfused_kernels"] / 2
    assert r["tower_fused_vs_unfused_rel"] < 1e-2
    fam = r["tower_graph_families"]  # with the gaps between kernels located
    assert set(fam["families_ms"]) == set(FAMILIES) and fam["families_ms"]["dense_gemm"] > 0
    assert fam["gaps"]["count"] > 0 and len(fam["gaps"]["largest"]) > 0


def test_report_shows_the_vision_table(result):
    _, doc = result
    text = report.prefill_section(doc, None)
    assert "**The vision path**" in text
    one = doc["vision"]["1"]
    assert f"| 1 | {sum(one['patches'])} | {one['soft_tokens']} |" in text
    assert "Where the tower's time goes" in text
    per_layer = one["tower_kernels_per_layer"] / one["tower_kernels"]
    assert "tower, ours unfused" in text and f"(unfused {per_layer * one['tower_unfused_kernels']:.0f})" in text
    assert "prompt, ours fused + PCG" in text
    assert f"{report.ms(one['prompt_pcg']['median_ms'])} · {report.times(one['prompt_x_floor'])} |" in text
