"""Experiment (no GPU needed): compile both expert GEMMs (gate/up with the token gather, down with the GELU) for
sm_90 under every ``MOE_SWEEP`` candidate and print shared memory, registers and stack (register spills) from ptxas,
so that a sweep on the H200 only times settings that fit. Also compiles ``moe_route``.

Uses Triton's ahead-of-time ``triton.compile`` with 16-byte divisibility hints on pointers and strides (what the
JIT infers at 26B-A4B shapes) and the ``cuobjdump`` shipped in Triton's wheel. Written against Triton 3.9; run it
*without* ``TRITON_INTERPRET``: ``python experiments/moe_gemm_resources.py [--all]`` (``--all``: also the tilings
the sweep leaves out).
"""

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gemma4lab.kernels import MOE_SWEEP, MoeConfig
from gemma4lab.kernels.moe_gemm import _moe_gemm_kernel
from gemma4lab.kernels.moe_route import _moe_route_kernel

TARGET = GPUTarget("cuda", 90, 32)
ALIGNED = {"a_ptr", "w_ptr", "offs_ptr", "idx_ptr", "out_ptr", "N", "K", "stride_am", "stride_we", "stride_wn",
           "stride_om", "ids_ptr", "slot_ptr", "pos_ptr"}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_sm90(fn, signature: dict, constants: dict, num_warps: int, num_stages: int) -> dict:
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED if n in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, signature, constants, attrs), target=TARGET,
                            options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK):(\d+)", usage))
    return {"shared": kernel.metadata.shared, "regs": int(fields["REG"]), "stack": int(fields["STACK"]),
            "wgmma": "wgmma" in kernel.asm["ptx"]}


def gemm(cfg: MoeConfig, gather: bool) -> dict:
    consts = dict(GATHER=gather, TOP_K=8, GELU_GATE=not gather, IEEE=False, W_SCALED=False, A_FP8=False,
                  SWAP_AB=cfg.swap_ab, E=128, E_POW2=128, COMPACT=False, PDL=False,
                  COLUMNS_FIRST=cfg.columns_first, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
    sig = {"a_ptr": "*bf16", "w_ptr": "*bf16", "offs_ptr": "*i32", "idx_ptr": "*i32", "scale_ptr": "*fp32",
           "out_ptr": "*bf16",
           **dict.fromkeys(("M", "A_ROWS", "N", "K", "stride_am", "stride_we", "stride_wn", "stride_om"), "i32"),
           **dict.fromkeys(consts, "constexpr")}
    return compile_sm90(_moe_gemm_kernel, sig, consts, cfg.num_warps, cfg.num_stages)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--all", action="store_true", help="every block_m x (block_n, block_k, warps, stages) of a grid")
    args = p.parse_args()
    route = compile_sm90(_moe_route_kernel, {"ids_ptr": "*i64", "offs_ptr": "*i32", "slot_ptr": "*i32",
                                             "pos_ptr": "*i32", "n_slots": "i32", "E": "i32", "EXPERTS": "constexpr",
                                             "BLOCK": "constexpr", "PDL": "constexpr"},
                         {"EXPERTS": 1, "BLOCK": MoeConfig().route_block, "PDL": False}, MoeConfig().route_warps, 1)
    print(f"moe_route: {route}")
    cfgs = MOE_SWEEP if not args.all else [
        MoeConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
        for bm in (16, 32, 64, 128) for bn in (64, 128, 256) for bk in (64, 128) for nw in (4, 8) for ns in (3, 4)]
    for cfg in cfgs:
        try:
            up, down = gemm(cfg, True), gemm(cfg, False)
        except Exception as e:  # noqa: BLE001  (out of shared memory and the like)
            print(f"{cfg}: {type(e).__name__} {str(e)[:80]}")
            continue
        spill = " SPILLS" if up["stack"] or down["stack"] else ""
        print(f"m{cfg.block_m} n{cfg.block_n} k{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}: gate/up "
              f"{up['shared'] // 1024} KB smem {up['regs']} regs; down {down['shared'] // 1024} KB {down['regs']} regs "
              f"stack {down['stack']}{spill}", flush=True)


if __name__ == "__main__":
    main()
