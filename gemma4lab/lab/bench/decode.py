"""Decode against the bytes a step must read: ``python -m gemma4lab bench-decode``.

One process, one card, random weights at the real shapes. For each context (default 512, 4096 and 16384 tokens):
distinct random prompts, one per sequence of the largest batch (identical prompts would route identically and touch
fewer experts), prefilled one by one into the decode runner's static KV cache. Then, for each batch (default 1, 2,
4, 8, 16: the first ``batch`` sequences), greedy decoding through the generation loop
(``gemma4lab.runtime.generation.greedy_generate``: argmax, the stop check, the step), from the same cache state:

* **eager**: the decode step run op by op (``decode_step``);
* **graph**: the decode step replayed as one CUDA graph (``DecodeGraphRunner``; without CUDA the runner's eager
  fallback, and the results file says so).

Each mode has two times, both over ``--runs`` (>= 3) runs of ``--steps`` steps, as min / 20 % / median / 80 % / max:

* **step**: the device time of the step alone (CUDA events around each step; for the graph: the runner's input
  copies, the replay and its logits copy), without the loop's host work;
* **loop**: wall time per step of the whole loop, host work included (sampling, the stop check's host sync).

and the graph a third, ``replay_ms``: steps queued back to back (``measure.bench``), so the host is always ahead and
the time is the graph's own — the step time above also counts the GPU waiting while the host queues the replay after
the loop's sync, which grows on a busy host.

Every sequence produces one token per step, so ms per step is each sequence's time per output token and
tokens/s = batch / time per step. Floors from the same run (``gemma4lab.lab.floors.decode_floor``): the bytes a step
must read (non-expert weights, the distinct experts the batch touches, the KV cache its attention reads) over the
copy bandwidth, once with the experts expected under random routing (``expected_experts``) and once with the count
this run saw; ratios are taken to the latter. The greedy tokens of every run of both modes are compared with the
first eager run's, and the answer is recorded.

``results/decode_<card>.json``: the run's settings (``batches``, ``contexts``, ``steps``, ``runs``, ``fusion``,
``graphs``: whether CUDA graphs ran), ``copy_bandwidth_Bps``, per context ``contexts_run`` (prefill and capture
seconds, cache size) and ``rows["<batch>x<context>"]`` with ``experts_expected`` / ``experts_observed``,
``floor_expected`` / ``floor_observed`` (bytes by kind and ``floor_ms``), ``floor_ms``, per mode ``eager`` / ``graph``
(``step_ms``, ``loop_ms``, ``host_ms``, ``tokens_per_s``, ``x_floor``, the spreads; the graph also ``replay_ms``
and ``replay_x_floor``), ``tokens_equal`` and
``first_mismatch``; a point a mode could not run has ``unsupported`` (the runtime refused it: a ``ValueError``, its
message) or ``errors`` instead of that mode's entry. ``python -m gemma4lab.lab.report`` prints the table.

A serving engine's time per output token is measured at its client (scheduling, detokenisation and streaming
included); the nearest thing here is the loop time, not the step time, and even that runs in-process with none of the
engine's work: a comparison must say so.
"""

from __future__ import annotations

import argparse
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gemma4lab.lab import measure
from gemma4lab.lab.bench.common import device_arg, fmt_ms, out_dir, positive_int, positive_ints, random_prompt
from gemma4lab.lab.floors import decode_floor, expected_experts, text_weight_bytes
from gemma4lab.lab.report import decode_table
from gemma4lab.model.config import PRESETS, Gemma4Config
from gemma4lab.model.loading import random_init
from gemma4lab.runtime.generation import decode_step, greedy_generate
from gemma4lab.runtime.kv_cache import KVCache

BATCHES = (1, 2, 4, 8, 16)
CONTEXTS = (512, 4096, 16384)
#: mode key -> exactly what it ran, recorded in the results file
MODES = {"eager": "decode_step op by op, in greedy_generate's loop",
         "graph": "DecodeGraphRunner.step: one CUDA graph per batch size, in greedy_generate's loop"}
#: a token id no model emits: every sequence runs all steps, and the loop's stop check still runs at every one
NEVER = -1
MIN_RUNS = 3


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _prefill_rows(model, prompts: list[Tensor], cache: KVCache) -> Tensor:
    """Prefill each prompt alone and copy its K/V into row ``b`` of ``cache``: a packed prefill of 16 prompts of
    16384 tokens would need tens of GB of activations. Returns each prompt's last-token logits [B, vocab]."""
    one = KVCache(cache.cfg, 1, cache.max_len, cache.k[0].dtype, cache.k[0].device)
    logits = []
    for b, p in enumerate(prompts):
        logits.append(model.prefill([p], cache=one))
        for dst, src in zip(cache.k + cache.v, one.k + one.v):
            dst[b].copy_(src[0])
        cache.slot_pos[b].copy_(one.slot_pos[0])
    return torch.cat(logits)


def _snapshot(cache: KVCache) -> list[Tensor]:
    """The whole cache after prefill. Decode steps overwrite ring slots of sliding layers that later steps still
    read, so every run starts from a copy of this, not from what the last run left."""
    return [t.clone() for t in (*cache.k, *cache.v, cache.slot_pos)]


def _restore(cache: KVCache, saved: list[Tensor]) -> None:
    for dst, src in zip((*cache.k, *cache.v, cache.slot_pos), saved):
        dst.copy_(src)


def _generate(model, prompts: Tensor, logits: Tensor, cache: KVCache, saved: list[Tensor], step, steps: int
              ) -> tuple[Tensor, float]:
    """One greedy run of ``steps`` decode steps from the prefilled state: (new tokens [B, steps + 1], wall s). The
    prefill is not run again: its logits are handed to the loop, which samples the first token from them."""
    dev = logits.device
    _restore(cache, saved)
    _sync(dev)
    t0 = time.perf_counter()
    out = greedy_generate(model, prompts, steps + 1, step_fn=step, cache=cache, prefill_fn=lambda *a, **k: logits,
                          eos_token_id=NEVER, pad_token_id=model.config.text.pad_token_id)
    _sync(dev)
    return out[:, prompts.shape[1]:], time.perf_counter() - t0


def _mode(model, step_fn, prompts: Tensor, logits: Tensor, cache: KVCache, saved: list[Tensor], args,
          reference: Tensor | None) -> tuple[dict, list[Tensor], float | None]:
    """One mode at one point: a first run (warm-up; on the eager mode with the experts recorded, which syncs the host,
    so it is never timed), then ``args.runs`` timed runs. Returns (entry, tokens of every run, experts seen)."""
    from gemma4lab.lab import routing

    dev = logits.device
    seen = None
    t0 = time.perf_counter()
    if reference is None:
        with routing.expert_loads(model) as loads:
            first, _ = _generate(model, prompts, logits, cache, saved, step_fn, args.steps)
        seen = routing.experts_hit(loads) if loads else None
    else:
        first, _ = _generate(model, prompts, logits, cache, saved, step_fn, args.steps)
    first_s = time.perf_counter() - t0
    timer = measure.CallTimer(step_fn, dev)
    walls, tokens = [], [first]
    for _ in range(args.runs):
        got, wall = _generate(model, prompts, logits, cache, saved, timer, args.steps)
        tokens.append(got)
        walls.append(wall)
    each = timer.ms()
    if len(each) != args.runs * args.steps:
        raise RuntimeError(f"expected {args.runs * args.steps} timed steps, the loop made {len(each)}")
    per_run = [sum(each[r * args.steps:(r + 1) * args.steps]) / args.steps for r in range(args.runs)]
    step, loop = measure.spread(per_run), measure.spread([w * 1e3 / args.steps for w in walls])
    b = prompts.shape[0]
    entry = {"step_ms": step["median_ms"], "loop_ms": loop["median_ms"],
             "host_ms": loop["median_ms"] - step["median_ms"],
             "tokens_per_s": b / loop["median_ms"] * 1e3, "step_tokens_per_s": b / step["median_ms"] * 1e3,
             "step_stats": step, "loop_stats": loop, "each_step_stats": measure.spread(each), "first_run_s": first_s}
    return entry, tokens, seen


def _first_mismatch(reference: Tensor, mode: str, runs: list[Tensor]) -> dict | None:
    for r, got in enumerate(runs):
        diff = (got != reference).nonzero()
        if diff.numel():
            seq, step = (int(v) for v in diff[0])
            return {"mode": mode, "run": r, "sequence": seq, "step": step}
    return None


def _record_failure(row: dict, mode: str, e: Exception) -> None:
    """A ValueError is the runner or the loop refusing the point (batch, length): ``unsupported``, with its own
    message. Anything else is a failure: ``errors``. Neither leaves a number behind."""
    key = "unsupported" if isinstance(e, ValueError) else "errors"
    row.setdefault(key, {})[mode] = f"{type(e).__name__}: {e}"[:500]
    row.pop(mode, None)
    if key == "errors":
        traceback.print_exc()


def _point(model, runner, prompts: list[Tensor], logits: Tensor, saved: list[Tensor], batch: int, context: int,
           copy_bw: float, args, capture_error: Exception | None, expert_elem: int | None = None) -> dict:
    """Both modes at one (batch, context), the floors beside them (``expert_elem=1``: FP8 experts' floors)."""
    cfg = model.config.text
    lm = model.language_model
    ids, lg = torch.stack(prompts[:batch]), logits[:batch]
    elem = model.dtype.itemsize
    expected = expected_experts(cfg.num_experts, cfg.top_k_experts, batch) if cfg.enable_moe_block else 0.0
    floor = lambda experts: decode_floor(cfg, batch, context, experts, copy_bw, elem, args.steps,  # noqa: E731
                                         expert_elem_bytes=expert_elem)
    row: dict[str, Any] = {"batch": batch, "context": context, "experts_expected": expected,
                           "floor_expected": floor(expected)}
    steps = {"eager": lambda tok, pos: decode_step(lm, tok, pos, runner.cache), "graph": runner.step}
    reference, tokens = None, {}
    for mode, step_fn in steps.items():
        try:
            if mode == "graph" and capture_error is not None:
                raise capture_error
            entry, runs, seen = _mode(model, step_fn, ids, lg, runner.cache, saved, args, reference)
            row[mode], tokens[mode] = entry, runs
            if reference is None:
                reference = runs[0]
                row["experts_observed"] = seen
        except Exception as e:  # recorded, not fatal: the other points still stand
            _record_failure(row, mode, e)
    seen = row.get("experts_observed")
    if seen is not None:
        row["floor_observed"] = floor(seen)
    row["floor_basis"] = "observed" if seen is not None else "expected"
    row["floor_ms"] = row[f"floor_{row['floor_basis']}"]["floor_ms"]
    for mode in steps:
        if mode in row:
            row[mode]["x_floor"] = row[mode]["step_ms"] / row["floor_ms"]
            row[mode]["loop_x_floor"] = row[mode]["loop_ms"] / row["floor_ms"]
    if reference is not None and "graph" in tokens:
        mismatch = (_first_mismatch(reference, "eager", tokens["eager"][1:])
                    or _first_mismatch(reference, "graph", tokens["graph"]))
        row["tokens_equal"], row["first_mismatch"] = mismatch is None, mismatch
    if "graph" in row:
        # the replay alone: steps queued back to back, so the host is ahead and none of its time (queueing the
        # replay while the GPU waits, which the loop's step time counts) is in it — the graph's own cost
        tok = ids[:, -1].contiguous()
        pos = torch.full((batch,), context, dtype=torch.long, device=ids.device)
        step = lambda: runner.step(tok, pos)  # noqa: E731
        row["graph"]["replay_ms"] = measure.bench(step, rep_ms=args.replay_rep_ms)
        row["graph"]["replay_x_floor"] = row["graph"]["replay_ms"] / row["floor_ms"]
        if batch == min(args.batch) and expert_elem is None:
            # where a graph step's time goes: GPU time by op family, the gaps between its kernels and the kernels
            # it launches (one step, profiled)
            from gemma4lab.lab.profiling import family_summary, profile_forward

            row["graph_profile"] = {**family_summary(step, wall_ms=row["graph"]["replay_ms"]),
                                    "kernels": profile_forward(step)["kernels"]}
    if "graph" in row:
        row["graph"]["dependent_launch"] = runner.dependent_launch
        row["graph"]["branches"] = model.language_model.fusion.branches
        if args.launch_ab:
            _launch_ab_point(model, runner, row, ids, lg, saved, args, reference, step)
        if args.branches_ab:
            _branches_ab_point(model, runner, row, ids, lg, saved, args, reference, step)
    if "eager" in row and "graph" in row:
        row["graph_speedup_step"] = row["eager"]["step_ms"] / row["graph"]["step_ms"]
        row["graph_speedup_loop"] = row["eager"]["loop_ms"] / row["graph"]["loop_ms"]
    for mode in steps:
        e = row.get(mode) or {}
        print(f"{mode:>6} B={batch:>3} ctx={context:>6}: step {fmt_ms(e.get('step_ms'))} ms, loop "
              f"{fmt_ms(e.get('loop_ms'))} ms, floor {row['floor_ms']:.2f} ms"
              + (f" — {(row.get('unsupported') or row.get('errors') or {}).get(mode)}" if not e else ""), flush=True)
    return row


def _ab_point(model, runner, row: dict, ids: Tensor, lg: Tensor, saved: list[Tensor], args,
              reference: Tensor | None, step, key: str, label: str, flip: Callable[[bool], dict]) -> None:
    """The graph mode again with one setting flipped (``flip(True)`` returns what it set; ``flip(False)`` restores
    the runner's own), captured anew: the loop's step, the replay alone and its greedy tokens against the eager
    ones, recorded under ``row[key]``; then the own setting is restored and captured back."""
    batch = ids.shape[0]
    try:
        with warnings.catch_warnings():  # the recapture after a settings change is the point here, not news
            warnings.simplefilter("ignore")
            setting = flip(True)
            runner.capture(batches=[batch])
        entry, runs, _ = _mode(model, runner.step, ids, lg, runner.cache, saved, args, reference)
        entry["replay_ms"] = measure.bench(step, rep_ms=args.replay_rep_ms)
        for k, ms in (("x_floor", "step_ms"), ("loop_x_floor", "loop_ms"), ("replay_x_floor", "replay_ms")):
            entry[k] = entry[ms] / row["floor_ms"]
        entry["replay_vs_graph"] = entry["replay_ms"] / row["graph"]["replay_ms"]
        entry.update(setting)
        if reference is not None:
            mismatch = _first_mismatch(reference, key, runs)
            entry["tokens_equal"], entry["first_mismatch"] = mismatch is None, mismatch
        row[key] = entry
        print(f"    B={batch:>3} {label}: step {entry['step_ms']:.2f} ms, replay {entry['replay_ms']:.2f} ms "
              f"({entry['replay_vs_graph']:.3f}x the graph's), tokens equal: {entry.get('tokens_equal')}", flush=True)
    except Exception as e:  # recorded, not fatal
        _record_failure(row, key, e)
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flip(False)
            runner.capture(batches=[batch])


def _launch_ab_point(model, runner, row: dict, ids: Tensor, lg: Tensor, saved: list[Tensor], args,
                     reference: Tensor | None, step) -> None:
    """``graph_ab``: captured with programmatic dependent launch flipped (the runner's own setting is
    ``graph.dependent_launch``)."""
    own = runner.dependent_launch

    def flip(on: bool) -> dict:
        runner.dependent_launch = (not own) if on else own
        return {"dependent_launch": runner.dependent_launch}

    _ab_point(model, runner, row, ids, lg, saved, args, reference, step, "graph_ab",
              f"dependent launch {'on' if not own else 'off'}", flip)


def _branches_ab_point(model, runner, row: dict, ids: Tensor, lg: Tensor, saved: list[Tensor], args,
                       reference: Tensor | None, step) -> None:
    """``graph_branches_ab``: captured with ``Fusion.branches`` flipped (the dense MLP beside the experts on a second
    stream, or after them on one; the model's own setting is ``graph.branches``)."""
    own = model.language_model.fusion

    def flip(on: bool) -> dict:
        model.set_fusion(replace(own, branches=not own.branches) if on else own)
        return {"branches": model.language_model.fusion.branches}

    _ab_point(model, runner, row, ids, lg, saved, args, reference, step, "graph_branches_ab",
              f"branches {'on' if not own.branches else 'off'}", flip)


def _context(model, context: int, copy_bw: float, args, res: dict, batches: tuple[int, ...] | None = None,
             suffix: str = "", expert_elem: int | None = None) -> None:
    """Every batch at one context, over one runner whose cache holds the largest batch's prompts; recorded under
    ``rows{suffix}`` and ``contexts_run{suffix}`` (``_fp8``: the FP8-expert rows; ``_fp8a8``: FP8 experts fed FP8
    activations)."""
    from gemma4lab.runtime.decode_graphs import DecodeGraphRunner

    dev, cfg = model.device, model.config.text
    batches = tuple(batches or args.batch)
    runner = DecodeGraphRunner(model, max_batch=max(batches), max_len=context + args.steps + 1, progress=False)
    res["graphs"] = runner.use_graphs
    prompts = [random_prompt(context, cfg.vocab_size, seed=context * 1000 + b, device=dev)
               for b in range(max(batches))]
    t0 = time.perf_counter()
    logits = _prefill_rows(model, prompts, runner.cache)
    _sync(dev)
    info: dict[str, Any] = {"prefill_s": time.perf_counter() - t0, "max_len": runner.max_len,
                            "max_batch": runner.max_batch, "kv_cache_bytes": runner.cache.nbytes()}
    saved = _snapshot(runner.cache)
    capture_error = None
    try:
        info["capture_s"] = runner.capture()
    except Exception as e:  # every graph point records it
        capture_error = e
        traceback.print_exc()
    res.setdefault(f"contexts_run{suffix}", {})[str(context)] = info
    for b in batches:
        res.setdefault(f"rows{suffix}", {})[f"{b}x{context}"] = _point(model, runner, prompts, logits, saved, b,
                                                                       context, copy_bw, args, capture_error,
                                                                       expert_elem)
    del runner, saved, logits
    measure.release_memory()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from gemma4lab.lab import routing

    dev = torch.device(args.device)
    cfg = Gemma4Config.preset(args.preset)
    if args.layers:
        cfg = cfg.replace_text(num_hidden_layers=args.layers)
    cfg = Gemma4Config(text=cfg.text, vision=None)
    t0 = time.perf_counter()
    model = random_init(cfg, dtype=getattr(torch, args.dtype), device=dev, seed=0)
    model.set_fusion(args.fusion)
    res: dict[str, Any] = {"benchmark": "decode", "preset": args.preset, "layers": cfg.text.num_hidden_layers,
                           "dtype": args.dtype, "fusion": args.fusion, "modes": MODES, "batches": list(args.batch),
                           "contexts": list(args.context), "steps": args.steps, "runs": args.runs,
                           "attention_backend": model.language_model.backend_for(dev),
                           "build_s": time.perf_counter() - t0, "contexts_run": {}, "rows": {}}
    res.update(copy_bandwidth_Bps=measure.copy_bandwidth(dev), text_weight_bytes=text_weight_bytes(model))
    with torch.no_grad():
        if args.skew:
            calib = [random_prompt(256, cfg.text.vocab_size, seed=s, device=dev) for s in range(4)]
            res["routing"] = routing.skew_routing(model, args.skew, calib)
        else:
            res["routing"] = {"exponent": 0.0}
        for context in args.context:
            _context(model, context, res["copy_bandwidth_Bps"], args, res)
        if args.fp8_batch and cfg.text.enable_moe_block:  # last: it quantises the model in place
            from gemma4lab.model.quantize import quantize_experts, set_fp8_activations

            res["fp8"] = {"quantization": str(quantize_experts(model)), "batches": list(args.fp8_batch)}
            for suffix, acts in (("_fp8", False), ("_fp8a8", True)):  # FP8 weights; FP8 weights and activations
                set_fp8_activations(model, acts)
                for context in args.context:
                    _context(model, context, res["copy_bandwidth_Bps"], args, res, batches=args.fp8_batch,
                             suffix=suffix, expert_elem=1)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gemma4lab bench-decode", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=positive_ints, default=BATCHES, help="sequences decoded together")
    p.add_argument("--fp8-batch", type=lambda s: () if s.strip() in ("", "0") else positive_ints(s), default=(1,),
                   help="batches timed again with FP8 (e4m3) experts, last, against their own floors: weights only "
                        "(rows_fp8), then activations too (rows_fp8a8); 0 for none")
    p.add_argument("--context", type=positive_ints, default=CONTEXTS, help="prompt tokens per sequence")
    p.add_argument("--steps", type=positive_int, default=32, help="decode steps per timed run")
    p.add_argument("--runs", type=positive_int, default=5, help=f"timed runs per point and mode (>= {MIN_RUNS})")
    p.add_argument("--replay-rep-ms", type=float, default=100.0,
                   help="ms of back-to-back graph replays timed per point (the replay alone, without the loop)")
    p.add_argument("--launch-ab", action="store_true",
                   help="also time each point's graph captured with programmatic dependent launch flipped (graph_ab; "
                        "the runner captures with it wherever the card supports it)")
    p.add_argument("--branches-ab", action="store_true",
                   help="also time each point's graph captured with Fusion.branches flipped (graph_branches_ab: the "
                        "dense MLP beside the experts on a second stream, or after them on one)")
    p.add_argument("--preset", default="26b-a4b", choices=sorted(PRESETS))
    p.add_argument("--layers", type=positive_int, default=None, help="reduce depth (default: the preset's)")
    p.add_argument("--fusion", default="all", choices=["all", "none", "published"],
                   help="fused kernels of both modes (gemma4lab.runtime.fusion; 'none' for fast CPU smoke runs: the "
                        "Triton interpreter takes seconds a step)")
    p.add_argument("--skew", type=float, default=0.0,
                   help="Zipf exponent of the router-logit bias (gemma4lab.lab.routing; 0: uniform routing)")
    p.add_argument("--out", type=out_dir, default=Path("results"))
    p.add_argument("--device", type=device_arg, default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="weights and activations (the table is bf16; fp32 for CPU smoke runs)")
    args = p.parse_args(argv)
    if args.runs < MIN_RUNS:
        p.error(f"--runs must be >= {MIN_RUNS} (a spread needs at least three runs), got {args.runs}")
    if not (args.skew >= 0 and args.skew != float("inf")):
        p.error(f"--skew must be a finite number >= 0, got {args.skew}")
    if len(set(args.batch)) != len(args.batch) or len(set(args.context)) != len(args.context):
        p.error("--batch and --context must not repeat a value")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("bench-decode needs a CUDA GPU for the full-size model (~50 GB); a CPU smoke run: "
                "--device cpu --preset tiny --fusion none --context 40 --batch 1,2")
    args.out.mkdir(parents=True, exist_ok=True)
    res = run(args)
    path = measure.write_json(args.out / f"decode_{measure.card_slug()}.json", res)
    print(decode_table(res))
    from gemma4lab.lab import viz

    doc = measure.read_json(path)
    viz.save(viz.plot_decode(doc, viz.env_label(doc)), path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
