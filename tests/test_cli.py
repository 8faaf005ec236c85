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
@pytest.mark.parametrize("command", ["bench-prefill", "bench-pcg", "bench-attention", "bench-decode"])
def test_gpu_benchmarks_refuse_without_cuda(command):
    r = subprocess.run([sys.executable, "-m", "gemma4lab", command], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "needs a CUDA GPU" in r.stderr


BAD_ARGS = [(["--device", "banana"], "device"), (["--tokens", "0"], ">= 1"), (["--tokens", "12,x"], ">= 1"),
            (["--rep-ms", "-5"], "> 0")]
CASES = [(c, a, s) for c in ("bench-prefill", "bench-pcg", "bench-attention", "bench-kernels") for a, s in BAD_ARGS
         if not (c == "bench-kernels" and a[0] == "--rep-ms")]  # bench-kernels fixes its timing per mode


@pytest.mark.parametrize("command, args, says", CASES)
def test_bad_arguments_are_usage_errors_before_any_work(command, args, says, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and says in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["bench-prefill", "bench-pcg", "bench-attention", "bench-kernels", "bench-decode"])
def test_out_pointing_at_a_file_fails_at_once(command, tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("mine")
    with pytest.raises(SystemExit) as e:
        main([command, "--out", str(f)])
    assert e.value.code == 2 and "is a file" in capsys.readouterr().err
    assert f.read_text() == "mine"


def test_bench_kernels_rejects_hidden_zero(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench-kernels", "--quick", "--hidden", "0"])
    assert e.value.code == 2 and ">= 1" in capsys.readouterr().err
