"""Experiment: where the host spends a short PCG prefill, and whether the GPU waits for it.

At 93 tokens fused + PCG takes 16.17 ms with the GPU idle 1.62 ms of it (results/prefill_h200_small.json, 2df08a3),
and the widest gaps of its kernel timeline follow the prefill's own host reads and copies, not the pieces. This
splits the host's side of one prefill (``profiling.host_launch_times``: the setup before the first graph replay, the
eager work between replays, the tail after the last) and sets it beside the GPU's idle time and gaps, with the
prompt's ids given two ways: on the CPU, as a tokenizer hands them over (checked there, no device read), and
already on the device (the range check reads them back once, the placeholder count with it).

**Prediction:** the host's time between two replays (one eager attention call, ~30 µs unprofiled) stays far below
a piece's GPU time at 93 tokens (~0.45 ms), so the GPU never waits mid-forward; its idle time is the lead and the
tail — about 1.6 ms with ids on the device, less with ids on the CPU (a host read fewer).

    python experiments/prefill_host_time.py --tokens 93 189 --json results/runs/prefill_host_h200_<commit>.json
"""

from __future__ import annotations

import argparse
from dataclasses import fields, replace

import torch

from gemma4lab.lab import measure
from gemma4lab.lab.bench.common import random_prompt
from gemma4lab.lab.profiling import host_launch_times, time_by_family
from gemma4lab.model.config import Gemma4Config
from gemma4lab.model.loading import random_init
from gemma4lab.runtime.fusion import Fusion
from gemma4lab.runtime.pcg import PiecewiseCudaGraphRunner


def flipped_row(call, tokens: int, base_ms: float, reference: torch.Tensor, setting: str, value: bool) -> dict:
    """One prompt again with ``setting`` flipped to ``value`` (``call`` prefills it): its time against the runner's
    ``base_ms``, GPU busy and idle by family, and whether its logits equal ``reference`` bit for bit."""
    ms = measure.bench(call, rep_ms=300)
    fam = time_by_family(call, wall_ms=ms)
    equal = bool(torch.equal(call(), reference))
    print(f"T={tokens:>5} {setting.replace('_', ' ')} {'on' if value else 'off'}: {ms:.2f} ms ({ms / base_ms:.3f}x), "
          f"busy {fam['busy_ms']:.2f}, idle {fam['idle_ms']:.2f}; logits bit-identical: {equal}", flush=True)
    return {"tokens": tokens, setting: value, "ms": ms, "vs_runner": ms / base_ms, "busy_ms": fam["busy_ms"],
            "idle_ms": fam["idle_ms"], "families_ms": fam["families_ms"], "equal": equal}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[93, 189])
    p.add_argument("--layers", type=int, default=None, help="reduce depth (default: the preset's 30)")
    p.add_argument("--preset", default="26b-a4b", help="tiny + --device cpu: a smoke run (no graphs, no split)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default=None)
    p.add_argument("--launch-ab", action="store_true",
                   help="also time a runner whose pieces are captured with programmatic dependent launch flipped")
    p.add_argument("--flip", nargs="+", default=[], choices=[f.name for f in fields(Fusion)],
                   help="then time every prompt again with each of these Fusion switches flipped in turn (the pieces "
                        "captured anew), e.g. dense (the packed q/k/v and gate/up GEMMs) or branches")
    p.add_argument("--branches-ab", action="store_true", help="the same as --flip branches")
    args = p.parse_args()
    flips = list(dict.fromkeys(args.flip + (["branches"] if args.branches_ab else [])))
    cfg = Gemma4Config.preset(args.preset)
    if args.layers:
        cfg = cfg.replace_text(num_hidden_layers=args.layers)
    cfg = Gemma4Config(text=cfg.text, vision=None)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = random_init(cfg, dtype=dtype, device=args.device, seed=0)
    model.set_fusion("all")
    runner = PiecewiseCudaGraphRunner(model, max_tokens=max(512, *args.tokens), progress=False)
    runner.capture()
    pdl = None
    if args.launch_ab:
        pdl = PiecewiseCudaGraphRunner(model, max_tokens=max(512, *args.tokens), progress=False,
                                       dependent_launch=not runner.dependent_launch)
        pdl.capture()
    rows, logits = {}, {}
    with torch.no_grad():
        for t in args.tokens:
            for where in dict.fromkeys(("cpu", args.device)):
                ids = [random_prompt(t, cfg.text.vocab_size, seed=t, device=where)]
                call = lambda ids=ids: runner.prefill(ids)  # noqa: E731
                ms = measure.bench(call, rep_ms=300)
                fam = time_by_family(call, wall_ms=ms)
                host = host_launch_times(call)
                rows[f"{t}_{where}"] = {"tokens": t, "ids_on": where, "ms": ms, "busy_ms": fam["busy_ms"],
                                        "idle_ms": fam["idle_ms"], "gaps": fam["gaps"], "host": host}
                b = host["between_ms"]
                split = (f"lead {host['lead_ms']:.3f} ms, between {host['launches']} replays {b['sum']:.3f} ms "
                         f"(median {b['median'] * 1e3:.0f} µs, max {b['max'] * 1e3:.0f} µs), tail "
                         f"{host['tail_ms']:.3f} ms" if b is not None else "no graph replays")
                print(f"T={t:>5} ids on {where:>4}: {ms:.2f} ms, busy {fam['busy_ms']:.2f}, idle {fam['idle_ms']:.2f};"
                      f" host (profiled): {split}", flush=True)
            logits[t] = runner.prefill(ids)
            if pdl is not None:  # the same prompt through pieces captured with dependent launch: time and bits
                rows[f"{t}_ab"] = flipped_row(lambda ids=ids: pdl.prefill(ids), t, rows[f"{t}_{args.device}"]["ms"],
                                              logits[t], "dependent_launch", pdl.dependent_launch)
        own = model.language_model.fusion
        for name in flips:  # e.g. branches: the dense MLP beside the experts on a second stream, or after them
            value = not getattr(own, name)
            model.set_fusion(replace(own, **{name: value}))
            runner.capture()
            for t in args.tokens:
                ids = [random_prompt(t, cfg.text.vocab_size, seed=t, device=args.device)]
                rows[f"{t}_{name}_ab"] = flipped_row(lambda ids=ids: runner.prefill(ids), t,
                                                     rows[f"{t}_{args.device}"]["ms"], logits[t], name, value)
            model.set_fusion(own)
    if args.json:  # atomic, with card, versions, commit and date
        measure.write_json(args.json, {"benchmark": "prefill_host_time", "rows": rows})


if __name__ == "__main__":
    main()
