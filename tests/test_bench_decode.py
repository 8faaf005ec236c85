"""bench-decode's whole pipeline on the tiny config on CPU (unfused: the Triton interpreter takes seconds a step):
the result file it writes, the floors beside every point, the token check that can fail, the points the runtime
refuses, and what the report and the figure make of them."""

from __future__ import annotations

import pytest
import torch

from gemma4lab.lab import measure, report
from gemma4lab.lab.bench import decode
from gemma4lab.lab.floors import decode_floor, expected_experts
from gemma4lab.model.config import Gemma4Config
from gemma4lab.runtime.decode_graphs import DecodeGraphRunner

BATCHES, CONTEXTS, STEPS, RUNS = (1, 3), (8, 20), 4, 3  # 20 > the tiny window (16): sliding layers read a full ring


def _run(out, batches=BATCHES, contexts=CONTEXTS, steps=STEPS, device="cpu", fp8="0", extra=()) -> dict:
    on_cpu = device == "cpu"
    argv = ["--device", device, "--preset", "tiny", "--fusion", "none" if on_cpu else "all", "--dtype",
            "float32" if on_cpu else "bfloat16", "--runs", str(RUNS), "--steps", str(steps), "--batch",
            ",".join(map(str, batches)), "--context", ",".join(map(str, contexts)), "--fp8-batch", fp8,
            "--replay-rep-ms", "5", "--out", str(out), *extra]
    assert decode.main(argv) == 0
    return measure.read_json(out / f"decode_{measure.card_slug()}.json")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode")
    return out, _run(out)


def test_every_point_has_both_modes_with_their_spread(result):
    _, doc = result
    assert doc["benchmark"] == "decode" and doc["graphs"] is False and set(doc["modes"]) == {"eager", "graph"}
    assert sorted(doc["rows"]) == sorted(f"{b}x{c}" for b in BATCHES for c in CONTEXTS)
    for r in doc["rows"].values():
        assert "unsupported" not in r and "errors" not in r
        for mode in ("eager", "graph"):
            e = r[mode]
            for key in ("step_stats", "loop_stats"):
                st = e[key]
                assert st["runs"] == RUNS and st["min_ms"] <= st["median_ms"] <= st["max_ms"]
            assert e["each_step_stats"]["runs"] == RUNS * STEPS
            # the loop holds the step and more: every run's loop time >= its step time, so the medians are ordered
            assert e["loop_ms"] >= e["step_ms"] > 0 and e["host_ms"] == e["loop_ms"] - e["step_ms"]
            assert e["tokens_per_s"] == pytest.approx(r["batch"] / e["loop_ms"] * 1e3)
            assert e["x_floor"] == e["step_ms"] / r["floor_ms"] and e["first_run_s"] > 0
        assert r["graph_speedup_loop"] == r["eager"]["loop_ms"] / r["graph"]["loop_ms"]
        g = r["graph"]
        assert g["replay_ms"] > 0 and g["replay_x_floor"] == g["replay_ms"] / r["floor_ms"]
    for c in CONTEXTS:
        run = doc["contexts_run"][str(c)]
        assert run["max_len"] == c + STEPS + 1 and run["max_batch"] == max(BATCHES) and run["prefill_s"] > 0


def test_fp8_rows_are_timed_last_against_their_own_floor(tmp_path):
    """``--fp8-batch``: the batches timed again after the experts are quantised, each beside the FP8 floor, whose
    expert bytes are one byte a weight (a quarter of this fp32 model's, half of a bf16 one's) plus the scales."""
    doc = _run(tmp_path, batches=(1,), contexts=(8,), steps=2, fp8="1")
    bf16, fp8 = doc["rows"]["1x8"], doc["rows_fp8"]["1x8"]
    assert "FP8" in doc["fp8"]["quantization"] and doc["fp8"]["batches"] == [1]
    assert fp8["graph"]["step_ms"] > 0 and fp8["tokens_equal"] is True
    f16, f8 = bf16["floor_expected"], fp8["floor_expected"]
    assert f8["non_expert_bytes"] == f16["non_expert_bytes"] and f8["kv_bytes"] == f16["kv_bytes"]
    elem = 4  # the CPU run is fp32
    assert f16["expert_bytes"] / elem < f8["expert_bytes"] < 1.1 * f16["expert_bytes"] / elem
    a8 = doc["rows_fp8a8"]["1x8"]  # then FP8 activations into them: same floor, the kernel's FP8 × FP8 path
    assert a8["graph"]["step_ms"] > 0 and a8["tokens_equal"] is True and a8["floor_expected"] == f8
    table = report.decode_table(doc).splitlines()
    assert table[2].split(" | ")[1] == "1" and table[3].split(" | ")[1] == "1 · FP8 experts"
    assert table[4].split(" | ")[1] == "1 · FP8 experts + activations"


def test_launch_and_branches_ab_rows_beside_the_graph(tmp_path):
    """``--launch-ab`` / ``--branches-ab``: each point's graph again, captured with programmatic dependent launch
    (or ``Fusion.branches``) flipped, with its own step, replay and token check (on CPU the runner steps eagerly,
    with neither dependent launch nor a second stream: the plumbing, not the speed)."""
    doc = _run(tmp_path, batches=(2,), contexts=(8,), steps=2, extra=("--launch-ab", "--branches-ab"))
    r = doc["rows"]["2x8"]
    graph = r["graph"]
    assert graph["dependent_launch"] is False and graph["branches"] is False
    for key, setting in (("graph_ab", "dependent_launch"), ("graph_branches_ab", "branches")):
        ab = r[key]
        assert ab[setting] is True, key
        assert ab["tokens_equal"] is True and ab["first_mismatch"] is None and ab["step_ms"] > 0
        assert ab["replay_vs_graph"] == ab["replay_ms"] / graph["replay_ms"]
        assert ab["replay_x_floor"] == ab["replay_ms"] / r["floor_ms"]


def test_greedy_tokens_of_the_graph_equal_eager(result):
    _, doc = result
    for r in doc["rows"].values():
        assert r["tokens_equal"] is True and r["first_mismatch"] is None


def test_experts_seen_and_expected(result, tiny_config):
    """One sequence touches exactly top_k experts per layer; more lie between top_k and every expert; the expected
    count is the formula's."""
    _, doc = result
    t = tiny_config.text
    for r in doc["rows"].values():
        b, seen = r["batch"], r["experts_observed"]
        assert r["experts_expected"] == expected_experts(t.num_experts, t.top_k_experts, b)
        if b == 1:
            assert seen == t.top_k_experts
        else:
            assert t.top_k_experts < seen <= min(t.num_experts, b * t.top_k_experts)


def test_floors_are_the_floor_modules_at_the_run_bandwidth(result, tiny_config):
    _, doc = result
    bw = doc["copy_bandwidth_Bps"]
    for r in doc["rows"].values():
        b, c = r["batch"], r["context"]
        assert r["floor_observed"] == decode_floor(tiny_config, b, c, r["experts_observed"], bw, 4, STEPS)
        assert r["floor_expected"] == decode_floor(tiny_config, b, c, r["experts_expected"], bw, 4, STEPS)
        assert r["floor_basis"] == "observed" and r["floor_ms"] == r["floor_observed"]["floor_ms"]
    # a longer context reads more KV at the same batch; more sequences read more experts and more KV
    rows = doc["rows"]
    assert rows["1x20"]["floor_expected"]["kv_bytes"] > rows["1x8"]["floor_expected"]["kv_bytes"]
    assert rows["3x8"]["floor_expected"]["bytes"] > rows["1x8"]["floor_expected"]["bytes"]


def test_report_and_figure_read_the_result(result):
    out, _ = result
    text = report.readme_results(out)
    png = f"decode_{measure.card_slug()}.png"  # the card's name even for a CPU run on a GPU machine
    assert "### Decode" in text and f"![decode]({out.name}/{png})" in text and (out / png).exists()
    assert "| 20 | 3 |" in text and "No CUDA graphs in this run" in text and "Like with like" in text
    assert "at 4 of 4 points" in text


def test_a_graph_that_picks_other_tokens_is_caught(tmp_path, monkeypatch):
    """Sabotage the runner's step for the second sequence: its first decoded token (step 1) must be reported."""
    step = DecodeGraphRunner.step

    def wrong(self, tokens, positions):
        logits = step(self, tokens, positions)
        logits[1:] = logits[1:].roll(1, dims=-1)
        return logits

    monkeypatch.setattr(DecodeGraphRunner, "step", wrong)
    doc = _run(tmp_path, batches=(1, 2), contexts=(8,), steps=3)
    assert doc["rows"]["1x8"]["tokens_equal"] is True
    r = doc["rows"]["2x8"]
    assert r["tokens_equal"] is False and r["first_mismatch"] == {"mode": "graph", "run": 0, "sequence": 1, "step": 1}
    assert "**no**" in report.decode_table(doc) and "they differ at batch 2 × 8" in report.readme_results(tmp_path)


def test_a_point_the_runtime_refuses_is_recorded_with_its_message(tmp_path):
    """tiny holds 4096 positions: 4090 prompt tokens + 9 new ones do not fit. The loop refuses, and the point is
    recorded as unsupported with that message, with floors but without a time."""
    assert Gemma4Config.preset("tiny").text.max_position_embeddings == 4096
    doc = _run(tmp_path, batches=(1,), contexts=(4090,), steps=8)
    r = doc["rows"]["1x4090"]
    assert "eager" not in r and "graph" not in r and "tokens_equal" not in r
    for mode in ("eager", "graph"):
        assert "max_position_embeddings (4096)" in r["unsupported"][mode]
    assert r["floor_basis"] == "expected" and r["floor_ms"] > 0
    text = report.readme_results(tmp_path)
    assert "eager and graph not supported** at batch × context 1×4090" in text
    assert "| 4090 | 1 | — · 2.0 |" in text and "unsupported | unsupported" in text


@pytest.mark.parametrize(("argv", "says"), [
    (["--runs", "2"], ">= 3"), (["--batch", "0"], ">= 1"), (["--context", "512,x"], ">= 1"),
    (["--batch", "2,2"], "repeat"), (["--skew", "-1"], ">= 0"), (["--skew", "nan"], ">= 0"),
    (["--fusion", "some"], "invalid choice"), (["--steps", "0"], ">= 1"), (["--device", "tpu"], "device"),
])  # fmt: skip
def test_bad_arguments_are_usage_errors(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        decode.main(["--device", "cpu", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_needs_cuda_unless_told_cpu(capsys):
    with pytest.raises(SystemExit):
        decode.main([])
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_graphs_give_eagers_tokens_in_less_time(tmp_path):
    """On a GPU with real graphs and the fused kernels: every graph run's greedy tokens equal eager's, and a replayed
    step takes less device time than the same step launched op by op (tiny is all launch overhead)."""
    doc = _run(tmp_path, batches=(1, 4), contexts=(40,), steps=8, device="cuda")
    assert doc["graphs"] is True and doc["contexts_run"]["40"]["capture_s"] > 0
    for r in doc["rows"].values():
        assert r["tokens_equal"] is True, r["first_mismatch"]
        assert 0 < r["graph"]["step_ms"] < r["eager"]["step_ms"] and r["graph"]["loop_ms"] < r["eager"]["loop_ms"]
