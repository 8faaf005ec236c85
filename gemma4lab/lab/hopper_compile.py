"""Compile, for an H100/H200 (sm_90), every Triton kernel a CPU run launched: the interpreter never type-checks a
kernel the way the compiler does (a branch returning fp32 where another returns bf16 runs under it and fails
``triton.compile``), so CI records each launch under ``TRITON_INTERPRET=1`` and compiles the recorded variants
ahead of time — no GPU needed, ptxas ships with Triton.

Two steps in two processes, because a kernel module imported under the interpreter holds interpreted functions
that the compiler cannot take::

    with record_launches() as launches:        # TRITON_INTERPRET=1: run anything that launches kernels
        model(ids)
    report = compile_for_sm90(launches)        # a subprocess without TRITON_INTERPRET compiles each variant

Each variant is one kernel with one set of constexpr values, argument dtypes and launch options; its compiled
shared memory is checked against sm_90's per-block limit, which a launch on the card would otherwise refuse.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

#: sm_90's largest shared memory a block may use (227 KB, opt-in); a kernel above it fails at launch.
SM90_SHARED_BYTES = 232_448
#: Launch keywords that are compile options rather than kernel arguments.
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "launch_pdl")
_TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
                 torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
                 torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5"}


@dataclass(frozen=True)
class Launch:
    """One kernel variant: ``module:qualname``, each argument as a type (``*bf16``, ``i32``) or a constant value,
    and the compile options."""

    kernel: str
    args: tuple[tuple[str, object], ...]
    options: tuple[tuple[str, int], ...]


def _describe(value) -> tuple[str, object]:
    if isinstance(value, torch.Tensor):  # aligned as a launch would specialise it (16-byte divisibility)
        return ("ptr", "*" + _TRITON_DTYPE[value.dtype] + (":16" if value.data_ptr() % 16 == 0 else ""))
    if isinstance(value, bool) or value is None:
        return ("const", value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float", value)
    if hasattr(value, "primitive_bitwidth") or type(value).__module__.startswith("triton"):  # a tl.dtype constexpr
        return ("dtype", str(value))
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


@contextlib.contextmanager
def record_launches() -> Iterator[set[Launch]]:
    """Record every Triton launch inside the block (the kernels still run): the set of distinct variants."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("record_launches needs TRITON_INTERPRET=1 (on a GPU, compile by running the kernels)")
    from triton.runtime.interpreter import InterpretedFunction

    launches: set[Launch] = set()
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        options = tuple(sorted((k, kwargs[k]) for k in _OPTIONS if k in kwargs))
        named = dict(zip(self.arg_names, args, strict=False))
        named.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
        launches.add(Launch(f"{self.fn.__module__}:{self.fn.__qualname__}",
                            tuple((name, _describe(named[name])) for name in self.arg_names if name in named),
                            options))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


def with_dependent_launch(launches: set[Launch]) -> set[Launch]:
    """For each kernel that takes ``PDL``, its largest recorded variant as a card launches it under
    ``kernels.dependent_launch()``: ``PDL`` on and the launch option set (a CPU run records ``PDL=False``: the
    interpreter has no dependent launch). One variant a kernel: the PDL instructions are the same in every variant
    (the dense GEMM's L2 prefetch, sized by its K step, is the one that varies; its largest K step is kept), and
    compiling each variant twice doubles the check's time."""
    chosen: dict[str, Launch] = {}
    block_k = lambda launch: dict(launch.args).get("BLOCK_K", ("", 0))[1]  # noqa: E731
    for x in sorted(launches, key=repr):
        if dict(x.args).get("PDL") != ("const", False):
            continue
        if x.kernel not in chosen or block_k(x) > block_k(chosen[x.kernel]):
            chosen[x.kernel] = x
    out = set()
    for x in chosen.values():
        args = {**dict(x.args), "PDL": ("const", True)}
        options = tuple(sorted({**dict(x.options), "launch_pdl": True}.items()))
        out.add(Launch(x.kernel, tuple(args.items()), options))
    return out


@dataclass(frozen=True)
class CompileResult:
    kernel: str
    constants: dict
    shared_bytes: int | None
    error: str | None


def compile_for_sm90(launches: set[Launch], timeout_s: float = 600) -> list[CompileResult]:
    """Compile each recorded variant for sm_90 in a fresh interpreter (no ``TRITON_INTERPRET``)."""
    payload = json.dumps([{"kernel": x.kernel, "args": [[n, list(d)] for n, d in x.args], "options": dict(x.options)}
                          for x in sorted(launches, key=repr)])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "gemma4lab.lab.hopper_compile"], input=payload, text=True,
                          capture_output=True, env=env, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"the sm_90 compile process failed:\n{proc.stderr[-4000:]}")
    return [CompileResult(**r) for r in json.loads(proc.stdout)]


def _compile_one(item: dict) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, qualname = item["kernel"].split(":")
    fn = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    signature, constexprs, constants, attrs = {}, {}, {}, {}
    for name, (kind, value) in item["args"]:
        index = fn.arg_names.index(name)
        param = fn.params[index]
        # the specialisation a launch makes: 16-divisible pointers and integers (not those marked do_not_specialize)
        if not param.is_constexpr and not getattr(param, "do_not_specialize", False) and (
                kind == "ptr" and value.endswith(":16") or kind == "int" and value % 16 == 0 and value != 0):
            attrs[(index,)] = [["tt.divisibility", 16]]
        if param.is_constexpr or kind in ("const", "dtype"):
            if kind == "dtype":
                value = getattr(triton.language, value)
            signature[name] = "constexpr"
            constexprs[(fn.arg_names.index(name),)] = value
            constants[name] = str(value)
        elif kind == "ptr":
            signature[name] = value.removesuffix(":16")
        elif kind == "int":
            signature[name] = "i64" if not -(2**31) <= value < 2**31 else "i32"
        else:
            signature[name] = "fp32"
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32), options=item["options"])
        return {"kernel": item["kernel"], "constants": constants, "shared_bytes": int(compiled.metadata.shared),
                "error": None}
    except Exception as exc:  # reported per variant: one broken branch must not hide the others
        return {"kernel": item["kernel"], "constants": constants, "shared_bytes": None,
                "error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}


if __name__ == "__main__":
    items = json.loads(sys.stdin.read())
    print(json.dumps([_compile_one(item) for item in items]))
