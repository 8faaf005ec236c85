"""gemma4lab.lab.profiling's GPU time by family: the name → family table on real kernel names, the interval
arithmetic on hand-made spans, and a CPU trace (no kernels: dispatched ops stand in)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gemma4lab.lab import measure
from gemma4lab.lab.floors import FAMILIES
from gemma4lab.lab.profiling import (
    KERNEL_FAMILIES,
    family_times,
    graph_launch_gaps,
    host_launch_times,
    idle_ms,
    kernel_family,
    time_by_family,
    timeline_gaps,
)

ROOT = Path(__file__).resolve().parents[1]

#: top kernel names of a real H200 profile (results/prefill_h200.json, section "layer": one MoE layer alone, ours
#: unfused and fused, and transformers), as bench-prefill recorded them: cut at the first "(" or "<"
H200_LAYER = {
    "_moe_gemm_kernel": "expert_gemm",
    "void at::cuda::detail::prepare_grouped_gemm_data": "expert_gemm",
    "_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm6": "expert_gemm",
    "nvjet_sm90_tst_64x32_64x16_4x1_v_bz_TNT": "dense_gemm",
    "nvjet_sm90_tst_64x8_64x16_2x4_h_bz_splitK_TNT": "dense_gemm",
    "nvjet_sm90_tst_128x248_64x4_2x1_v_bz_coopA_TNT": "dense_gemm",
    "void cublasLt::splitKreduce_kernel": "dense_gemm",
    "void cutlass::Kernel2": "dense_gemm",
    "_prefill_attention_kernel": "attention",
    "void at_cuda_detail::cub::detail::radix_sort::DeviceRadixSortOnesweepKernel": "routing",
    "void at_cuda_detail::cub::detail::scan::DeviceScanInitKernel": "routing",
    "void at_cuda_detail::cub::detail::scan::DeviceScanKernel": "routing",
    "void at::native::index_elementwise_kernel": "routing",
    "void at::native::vectorized_gather_kernel": "routing",
    "_qkv_norm_rope_kernel": "row_kernels",
    "_post_attention_kernel": "row_kernels",
    "_gelu_tanh_mul_kernel": "row_kernels",
    "void at::native::vectorized_elementwise_kernel": "row_kernels",
    "void at::native::elementwise_kernel": "row_kernels",
    "void at::native::unrolled_elementwise_kernel": "row_kernels",
    "void at::native::reduce_kernel": "row_kernels",
    "void at::native::": "other",  # names cut inside "(anonymous namespace)": nothing left to tell
    "void ": "other",
}

#: full names as the profiler reports them (templates, arguments, anonymous namespaces), and CPU op names
FULL_NAMES = {
    "void at::native::(anonymous namespace)::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, "
    "true>(at::cuda::detail::TensorInfo<c10::BFloat16, unsigned int>, long)": "other",
    "void (anonymous namespace)::softmax_warp_forward<float, float, float, 8, false, false>(float*, float const*, "
    "int, int, int, bool const*, int, bool)": "routing",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, "
    "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul>)": "row_kernels",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<256, 64, 64, 4>, true>(Flash_fwd_params)":
        "attention",
    "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t>::Params)":
        "attention",
    "void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4, false>(...)": "dense_gemm",
    "Memcpy DtoD (Device -> Device)": "row_kernels",
    "Memset (Device)": "row_kernels",
    "Memcpy HtoD (Pageable -> Device)": "other",
    "aten::linear": "dense_gemm", "aten::mm": "dense_gemm", "aten::_grouped_mm": "expert_gemm",
    "aten::scaled_dot_product_attention": "attention", "aten::topk": "routing", "aten::index_put_": "routing",
    "aten::embedding": "other", "aten::mul": "row_kernels", "aten::index_select": "row_kernels",
    "gemma4lab::moe_gemm": "expert_gemm", "gemma4lab::prefill_attention": "attention",
    "gemma4lab::router_topk": "routing", "gemma4lab::moe_combine": "routing",
    "gemma4lab::post_attention_block": "row_kernels", "gemma4lab::dual_rmsnorm_residual_scalar": "row_kernels",
}


@pytest.mark.parametrize(("name", "family"), [*H200_LAYER.items(), *FULL_NAMES.items()],
                         ids=lambda v: v[:48] if isinstance(v, str) else v)  # fmt: skip
def test_kernel_family(name, family):
    assert kernel_family(name) == family


def test_the_table_names_every_family_and_no_other():
    assert {fam for _, fam in KERNEL_FAMILIES} | {"other"} == set(FAMILIES)


def test_recorded_kernels_of_ours_and_of_cublas_have_a_family():
    """Whatever a new H200 run records: our Triton kernels and cuBLAS's GEMMs never land in "other"."""
    doc = measure.read_json(ROOT / "results" / "prefill_h200.json") if (ROOT / "results").is_dir() else None
    if not doc or not doc.get("layer"):
        pytest.skip("no recorded prefill_h200.json with a layer section")
    names = {name for entry in doc["layer"].values() for key, tops in entry.items() if key.endswith("top_kernels")
             for name, _ in tops}
    names |= {name for entry in doc["layer"].get("hf", {}).values() for name, _ in entry.get("top_kernels", [])}
    ours = [n for n in names if n.startswith(("_", "nvjet")) and not n.startswith("_ZN")]
    assert ours and all(kernel_family(n) != "other" for n in ours)


def test_a_bad_name_is_a_type_error():
    with pytest.raises(TypeError, match="str"):
        kernel_family(None)


def test_family_times_merge_overlaps_and_leave_idle_time():
    spans = [("dense_gemm", 0.0, 100.0), ("dense_gemm", 50.0, 150.0), ("routing", 140.0, 200.0),
             ("attention", 300.0, 400.0)]  # fmt: skip  (µs)
    out = family_times(spans, wall_ms=1.0)
    assert out["families_ms"] == {"expert_gemm": 0.0, "dense_gemm": 0.15, "attention": 0.1, "routing": 0.06,
                                  "row_kernels": 0.0, "other": 0.0}  # fmt: skip
    assert out["busy_ms"] == pytest.approx(0.3)  # [0, 200] and [300, 400]: the overlap of two families counts once
    assert out["idle_ms"] == pytest.approx(0.7)
    assert idle_ms(5.0, 7.0) == 0.0  # a profiled busy time above a latency timed apart


@pytest.mark.parametrize(("span", "match"), [(("magic", 0.0, 1.0), "unknown family"), (("other", 2.0, 1.0), "ends")])
def test_family_times_refuse_bad_spans(span, match):
    with pytest.raises(ValueError, match=match):
        family_times([span], wall_ms=1.0)


def _mixed() -> None:
    x, w = torch.randn(64, 128), torch.randn(128, 128)
    h = F.linear(x, w)
    torch.topk(torch.softmax(h, dim=-1), 4, dim=-1)
    q = h.view(64, 4, 32).transpose(0, 1)
    F.scaled_dot_product_attention(q, q, q, is_causal=True)


def test_timeline_gaps_locate_the_waits_between_kernels():
    """Out-of-order spans, an overlap (no gap) and a kernel nested in a longer one (the gap after them is measured
    from the longer one's end); templates and arguments cut from the names."""
    spans = [("c", 30.0, 31.0), ("a(int)", 0.0, 10.0), ("b<float>", 12.0, 20.0), ("nested", 14.0, 16.0),
             ("d", 30.5, 40.0), ("c", 45.0, 50.0)]
    g = timeline_gaps(spans, top=2)
    assert g["count"] == 3 and g["sum_ms"] == pytest.approx((2 + 10 + 5) / 1e3)
    assert g["largest"] == [[10.0, "b", "c"], [5.0, "d", "c"]]
    assert g["by_next_us"] == {"c": 15.0, "b": 2.0}
    assert g["span_ms"] == pytest.approx(0.05)
    assert timeline_gaps([]) == {"sum_ms": 0.0, "count": 0, "span_ms": 0.0, "largest": [], "by_next_us": {}}
    with pytest.raises(ValueError, match="ends before"):
        timeline_gaps([("a", 2.0, 1.0)])
    with pytest.raises(ValueError, match="top"):
        timeline_gaps(spans, top=-1)


def test_graph_launch_gaps_split_the_hosts_time_around_the_replays():
    """Setup before the first replay, the eager work between replays, the tail after the last."""
    spans = [("aten::aminmax", 0.0, 30.0), ("cudaGraphLaunch", 100.0, 110.0), ("aten::attention", 115.0, 140.0),
             ("cudaGraphLaunch", 150.0, 160.0), ("cudaGraphLaunch", 165.0, 175.0), ("aten::mm", 200.0, 400.0)]
    g = graph_launch_gaps(spans)
    assert g["launches"] == 3 and g["lead_ms"] == pytest.approx(0.1) and g["tail_ms"] == pytest.approx(0.225)
    assert g["between_ms"] == pytest.approx({"sum": 0.045, "median": 0.04, "max": 0.04})
    assert graph_launch_gaps([("aten::mm", 0.0, 5.0)]) == {"launches": 0, "lead_ms": None, "between_ms": None,
                                                          "tail_ms": None}
    # on a CPU there are no graphs to launch: the summary says so instead of inventing a split
    assert host_launch_times(_mixed, warmup=0)["launches"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU proxy; a GPU traces kernels instead")
def test_time_by_family_on_cpu_counts_the_dispatched_ops():
    out = time_by_family(_mixed, warmup=1)
    fams = out["families_ms"]
    assert fams["dense_gemm"] > 0 and fams["routing"] > 0 and fams["attention"] > 0
    assert fams["expert_gemm"] == 0.0
    assert out["busy_ms"] == pytest.approx(sum(fams.values()))  # one thread: the ops never overlap
    assert out["busy_ms"] < out["wall_ms"] and out["idle_ms"] == out["wall_ms"] - out["busy_ms"]
    assert out["device"] == "cpu" and out["wall_source"] == "the profiled call"
    assert out["gaps"]["count"] >= 1 and out["gaps"]["span_ms"] > 0  # host time between the dispatched ops
    timed = time_by_family(_mixed, warmup=0, wall_ms=1000.0)
    assert timed["wall_ms"] == 1000.0 and timed["idle_ms"] == 1000.0 - timed["busy_ms"]
    assert timed["wall_source"] == "timed apart"


@pytest.mark.parametrize(("wall", "error"), [(0.0, ValueError), (float("nan"), ValueError), ("3", TypeError),
                                             (True, TypeError)])
def test_time_by_family_refuses_a_bad_wall_time(wall, error):
    with pytest.raises(error, match="wall_ms"):
        time_by_family(_mixed, warmup=0, wall_ms=wall)


def test_profiling_prints_no_native_profiler_lines(capfd):
    """The profiler's C++ side prints ``USDT: … profiler_start`` at every start and stop; under a notebook cell that
    reads like an error, so profile_forward silences it (and only it: Python's own stderr still shows)."""
    import sys

    import torch

    from gemma4lab.lab.profiling import profile_forward

    def fn():
        print("still here", file=sys.stderr)
        return torch.ones(3) + 1

    profile_forward(fn, warmup=0)
    err = capfd.readouterr().err
    assert "USDT" not in err and "profiler_st" not in err, err
    assert "still here" in err
