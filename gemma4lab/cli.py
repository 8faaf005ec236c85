"""Command-line entry point: ``python -m gemma4lab <command>`` (or the ``gemma4lab`` script).

Commands:
  bench-kernels   fused kernels vs eager vs torch.compile vs the copy-bandwidth floor  → results/kernels_<card>.json
  bench-pcg       piecewise CUDA graphs on a reduced-depth model                         → results/pcg_<card>.json
  bench-prefill   full-size 26B-A4B prefill table against floors and peers                → results/prefill_<card>.json
  bench-attention attention options for head 256/512, window and images  → results/attention_<card>.json
  bench-decode    decode ms per token and tokens/s, eager and CUDA graph, against the bytes-read floor
                  (batch 1-16, contexts 512-16384)                                       → results/decode_<card>.json
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "bench-kernels": "gemma4lab.lab.bench.kernels",
    "bench-pcg": "gemma4lab.lab.bench.pcg",
    "bench-prefill": "gemma4lab.lab.bench.prefill",
    "bench-attention": "gemma4lab.lab.bench.attention",
    "bench-decode": "gemma4lab.lab.bench.decode",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if (not argv or argv[0] in ("-h", "--help")) else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)
