"""The command-line entry point: help, unknown commands, and GPU benchmarks refusing clearly on a CPU machine."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gemma4lab.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_is_an_error(capsys):
    assert main(["bench-everything"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("command", ["bench-prefill", "bench-pcg", "bench-attention"])
def test_gpu_benchmarks_refuse_without_cuda(command):
    r = subprocess.run([sys.executable, "-m", "gemma4lab", command], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "needs a CUDA GPU" in r.stderr
