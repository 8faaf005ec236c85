"""The notebooks' figures and recorded-results loading, as small pure functions.

Why here and not in the notebooks: a plot defined inline is only tested by running the whole notebook, and the
same loading/labelling code was being copied between notebooks. Every ``plot_*`` takes data (a ``results/*.json``
document, or live numbers) and returns a :class:`matplotlib.figure.Figure`. They never call ``plt.show()``, never
touch pyplot's global figure list and never read files: a notebook displays the returned figure (as a cell's last
expression, or through ``interact``), and a test counts its axes and lines.

Nothing here imports Triton or the kernels, so a notebook can import it before ``gemma4lab.lab.notebook.setup``
has chosen the Triton interpreter.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Patch
from matplotlib.ticker import FuncFormatter, NullLocator

from gemma4lab.lab import measure
from gemma4lab.lab.profiling import idle_ms
from gemma4lab.lab.report import DECODE_MODES, FAMILY_LABELS, PREFILL_COLUMNS

__all__ = [
    "DECODER_LAYER_STAGES",
    "breakdown_data",
    "breakdown_entry",
    "env_label",
    "kernel_lines",
    "kernel_rows",
    "load_recorded",
    "plain_log_ticks",
    "plot_attention_sweep",
    "plot_breakdown",
    "plot_decode",
    "plot_decoder_layer",
    "plot_error_bars",
    "plot_error_histograms",
    "plot_families",
    "plot_kernels",
    "plot_launches",
    "plot_layer_errors",
    "plot_moe_sweep",
    "plot_padding_waste",
    "plot_pcg_bench",
    "plot_pcg_latency",
    "plot_pcg_speedup",
    "plot_photo_tokens",
    "plot_prefill",
    "plot_prompt_tokens",
    "plot_roofline",
    "plot_timeline",
    "plot_traffic",
]

#: (row key, legend label) of the three implementations that ``bench-pcg`` times.
PCG_SERIES = (("eager_unfused_ms", "eager, unfused"), ("eager_fused_ms", "eager, fused"),
              ("pcg_fused_ms", "fused + PCG"))  # fmt: skip

#: matplotlib format of each ``bench-prefill`` column (the labels and legend order are the report's)
_PREFILL_STYLE = {"eager": "C3o-", "fused": "C0o-", "pcg": "C2o-", "compile_fused": "C6o--", "compile_pieces": "C8o--",
                  "hf": "C7o:", "hf_compile": "C1o--", "hf_compile_ro": "C4o--", "hf_patched": "C9s-",
                  "hf_patched_pcg": "C9s--", "pcg_fp8": "C2^--", "pcg_fp8a8": "C2v:"}
#: (row key, matplotlib format, label) of what ``bench-prefill`` records, in legend order.
PREFILL_SERIES = (*((f"{c}_ms", _PREFILL_STYLE[c], label) for c, label in PREFILL_COLUMNS),
                  ("floor_ms", "C5:", "floor (same run)"))


# --------------------------------------------------------------------------------------------------- setup, loading



def _two_and_five(v: float, _pos: Any = None) -> str:
    """Labels for the minor ticks of a log axis: only 2× and 5× a power of ten, so an axis spanning less than a
    decade still reads, and a wide one stays uncluttered."""
    mantissa = v / 10 ** np.floor(np.log10(v)) if v > 0 else 0
    return f"{v:g}" if round(mantissa, 6) in (2.0, 5.0) else ""


def plain_log_ticks(ax, axis: str = "both") -> None:
    """Plain numbers (``100``, ``200``, ``500``, ``1000``) on a log axis instead of ``10²`` / ``10³``: token counts
    and milliseconds read at a glance; the other minor ticks keep their grid lines but no label."""
    for a in ((ax.xaxis, ax.yaxis) if axis == "both" else (ax.xaxis,) if axis == "x" else (ax.yaxis,)):
        if a.get_scale() == "log":
            a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            a.set_minor_formatter(FuncFormatter(_two_and_five))

def save(fig: Figure, path: str | Path) -> Path:
    """Write a figure next to its results file (benchmarks call this; they draw nothing themselves)."""
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def env_label(doc: Mapping[str, Any]) -> str:
    """"card · torch X · triton Y · date" of a result document: a recorded number means nothing without it."""
    e = doc.get("environment", {}) or {}
    return (f"{e.get('card', '?')} · torch {e.get('torch', '?')} · triton {e.get('triton', '?')} · "
            f"{str(e.get('date_utc', '?'))[:10]}")


def load_recorded(kind: str, results_dir: str | Path) -> tuple[dict[str, Any], str] | None:
    """The first ``results_dir/<kind>_*.json`` that gemma4lab wrote, as ``(doc, env_label(doc))``; None if none.

    Notebooks show recorded GPU numbers only when a file exists, and say how to produce one otherwise; files not
    written by gemma4lab (or unreadable) are skipped rather than plotted.
    """
    for path in sorted(Path(results_dir).glob(f"{kind}_*.json")):
        doc = measure.read_json(path)
        if doc:
            return doc, env_label(doc)
    return None


def _points(rows: Sequence[Mapping[str, Any]], key: str) -> list[tuple[float, float]]:
    """(tokens, value) for the rows that have a numeric ``key``: missing or failed measurements are left out."""
    return [(r["tokens"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]


def _rows_by_tokens(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    return sorted(doc.get("rows", {}).values(), key=lambda r: r["tokens"])


# ------------------------------------------------------------------------------------------------------ 00 and 07


#: One MoE decoder layer as the fused prefill runs it (``Fusion.all()``): (column, lane, label, registered kernel or
#: None for a library GEMM). Lane 0 is the main path; lanes 1 and 2 are the dense MLP and the MoE block, which read
#: the same normed input. Columns 1-11 are one PCG piece; the attention calls sit outside the pieces.
DECODER_LAYER_STAGES: tuple[tuple[int, int, str, str | None], ...] = (
    (0, 0, "attention\nlayer i−1", "prefill_attention"),
    (1, 0, "o_proj", None),
    (2, 0, "post-attn norm\n+ residual\n+ 3 input norms", "post_attention_block"),
    (3, 1, "MLP gate|up", None), (4, 1, "GELU(gate)·up", "gelu_tanh_and_mul"), (5, 1, "MLP down", None),
    (3, 2, "router logits", None), (4, 2, "softmax,\ntop-8, scale", "router_topk"),
    (5, 2, "offsets,\nsorted slots", "moe_route"), (6, 2, "experts gate|up\n+ token gather", "moe_gemm"),
    (7, 2, "experts down\n+ GELU on load", "moe_gemm"), (8, 2, "un-sort,\nweight, sum", "moe_combine"),
    (9, 0, "MoE epilogue\n+ next layer's\ninput norm", "dual_rmsnorm_residual_scalar_next_norm"),
    (10, 0, "q|k|v\nprojections", None), (11, 0, "q/k norms\n+ RoPE", "qkv_norm_rope_"),
    (12, 0, "attention\nlayer i", "prefill_attention"),
)


def _wrap_name(name: str, width: int) -> str:
    """An op name broken after its underscores into lines of at most ``width`` characters (never inside a word)."""
    lines: list[str] = []
    for part in re.split(r"(?<=_)", name):
        if lines and len(lines[-1]) + len(part) <= width:
            lines[-1] += part
        else:
            lines.append(part)
    return "\n".join(lines)


def plot_decoder_layer() -> Figure:
    """One MoE decoder layer of the fused prefill (00): every box a kernel launch, coloured by what runs it (a
    library GEMM or one of our fused kernels, named as its ``torch.ops.gemma4lab`` op), and the stretch one PCG
    piece captures — everything between two attention calls, which run outside the graphs on the real tokens."""
    fig = Figure(figsize=(15, 4.6))
    ax = fig.subplots()
    lane_y = {0: 1.0, 1: 2.1, 2: -0.1}
    ax.axvspan(0.55, 11.45, ymin=0.02, ymax=0.98, color="C2", alpha=0.07)
    ax.text(6.0, 2.95, "one PCG piece: layer i's second half + layer i+1's first half, replayed as one CUDA graph",
            ha="center", fontsize=9, color="C2")
    for col, lane, label, op in DECODER_LAYER_STAGES:
        color = "0.85" if op is None else "C1" if op == "prefill_attention" else "C0"
        y = lane_y[lane]
        ax.add_patch(FancyBboxPatch((col - 0.45, y - 0.45), 0.9, 0.9, boxstyle="round,pad=0.02", fc=color,
                                    ec="0.3", lw=0.6, alpha=0.9))
        ax.text(col, y + 0.1, label, ha="center", va="center", fontsize=6.5,
                color="white" if op is not None else "black")
        name = _wrap_name(op or "GEMM", 15)
        ax.text(col, y - 0.3, name, ha="center", va="center", fontsize=5, style="italic",
                color="white" if op is not None else "0.3")
    for (c0, l0), (c1, l1) in (((2, 0), (3, 1)), ((2, 0), (3, 2)), ((5, 1), (9, 0)), ((8, 2), (9, 0))):
        ax.annotate("", (c1 - 0.47, lane_y[l1]), (c0 + 0.47, lane_y[l0]),
                    arrowprops={"arrowstyle": "->", "lw": 0.7, "color": "0.4"})
    for c in (0, 1, 9, 10, 11):
        ax.annotate("", (c + 1 - 0.47, 1.0), (c + 0.47, 1.0),
                    arrowprops={"arrowstyle": "->", "lw": 0.7, "color": "0.4"})
    ax.set(xlim=(-0.6, 12.6), ylim=(-0.65, 3.15))
    ax.axis("off")
    handles = [Patch(fc="0.85", ec="0.3", label="library GEMM (cuBLAS / grouped_mm)"),
               Patch(fc="C0", ec="0.3", label="fused Triton kernel (torch.ops.gemma4lab)"),
               Patch(fc="C1", ec="0.3", label="attention kernel, between the pieces")]
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8, frameon=False)
    ax.set_title("one MoE decoder layer of the fused prefill, in launch order", fontsize=10)
    return fig


def plot_photo_tokens(photo: Any, soft_tokens: int) -> Figure:
    """The photo with the number of soft tokens it becomes (00): the image's cost in prompt length at a glance."""
    fig = Figure(figsize=(3, 3.5))
    ax = fig.subplots()
    ax.imshow(photo)
    ax.set_title(f"{photo.width}×{photo.height} px → {soft_tokens} soft tokens", fontsize=9)
    ax.axis("off")
    return fig


def plot_prompt_tokens(photo: Any, input_ids: Any, image_token_id: int, boi_token_id: int,
                       eoi_token_id: int) -> Figure:  # fmt: skip
    """The photo beside its prompt as a strip of labelled runs — text, ``[boi]``, the image soft tokens, ``[eoi]``
    (07): where the image sits in the prompt and how much of it the image is."""
    ids = np.asarray(input_ids).reshape(-1)
    kinds = ("text", "boi", "image", "eoi")
    kind = np.select([ids == boi_token_id, ids == image_token_id, ids == eoi_token_id], [1, 2, 3], 0)
    colors = ("0.75", "C1", "C0", "C3")
    fig = Figure(figsize=(10, 3))
    a, b = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 4]})
    a.imshow(photo)
    a.axis("off")
    starts = [0, *(np.flatnonzero(np.diff(kind)) + 1).tolist()]
    narrow = 0  # labels of runs too narrow to hold them alternate above and below the strip, with a pointer
    for s0, s1 in zip(starts, [*starts[1:], len(kind)]):
        k = int(kind[s0])
        b.barh(0, s1 - s0, left=s0, height=0.6, color=colors[k], edgecolor="white", linewidth=0.5)
        text = kinds[k] if s1 - s0 == 1 else f"{kinds[k]} ×{s1 - s0}"
        if (s1 - s0) > 0.08 * len(kind):
            b.text((s0 + s1) / 2, 0, text, ha="center", va="center", fontsize=8, color="white" if k == 2 else "black")
        else:
            y = 0.75 if narrow % 2 == 0 else -0.75
            x = (s0 + s1) / 2
            b.annotate(text, (x, 0.3 if y > 0 else -0.3), (x, y), ha="center", va="bottom" if y > 0 else "top",
                       fontsize=8, arrowprops={"arrowstyle": "-", "lw": 0.6, "color": "0.4"})
            narrow += 1
    b.set(xlim=(0, len(kind)), ylim=(-1.2, 1.2), yticks=[], xlabel="prompt position",
          title=f"{len(kind)} prompt tokens: text, [boi], {int((kind == 2).sum())} image soft tokens, [eoi]")
    b.title.set_fontsize(9)
    for side in ("top", "right", "left"):
        b.spines[side].set_visible(False)
    return fig


# ------------------------------------------------------------------------------------------------------ 01 to 04


def plot_error_histograms(errors: Mapping[str, Any], rows: int, hidden: int) -> Figure:
    """Histogram of relative errors per computation, over the first ``rows`` rows of ``hidden`` elements (01).

    ``errors`` maps a name to the flattened per-element relative errors; the 2⁻⁸ line (the largest relative error
    one bf16 rounding can make) shows that one rounding stays within it. ``rows`` is the slider's knob: fewer rows,
    a noisier histogram.
    """
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    bins = np.logspace(-7, -1, 60)
    for name, e in errors.items():
        ax.hist(np.clip(np.asarray(e).reshape(-1)[: rows * hidden], 1e-7, None), bins=bins, alpha=0.6, label=name)
    ax.axvline(2**-8, color="k", ls="--", lw=1, label="one bf16 rounding, at most (2⁻⁸)")
    ax.set(xscale="log", xlabel="relative error vs float64", ylabel="elements",
           title=f"RMSNorm in bf16, {rows} rows × {hidden}")  # fmt: skip
    ax.legend(fontsize=8)
    return fig


def plot_traffic(fused_kb: float, unfused_kb: float) -> Figure:
    """Bytes per token, fused vs unfused (02): a memory-bound chain costs what it moves."""
    fig = Figure(figsize=(6, 2.5))
    ax = fig.subplots()
    ax.barh(["fused", "unfused"], [fused_kb, unfused_kb], color=["C2", "C3"])
    ax.set(xlabel="KB per token (bf16, H = 2816; fp32 intermediates count 2 units)",
           title="memory traffic of norm + residual + scalar")  # fmt: skip
    return fig


def kernel_rows(doc: Mapping[str, Any], kernel: str) -> list[dict[str, Any]]:
    """A ``kernels_*.json`` document's rows for ``kernel``, by tokens.

    The benchmark names kernels without the ``gemma_`` prefix of the Python function, so both spellings match.
    """
    names = {kernel, kernel.removeprefix("gemma_")}
    return sorted((r for r in doc.get("results", []) if r.get("kernel") in names), key=lambda r: r["tokens"])


def kernel_lines(doc: Mapping[str, Any], kernels: Sequence[str]) -> list[str]:
    """One line per recorded (kernel, tokens) of ``kernels``: µs per call in a CUDA graph, the fraction of copy
    bandwidth, and the speed-up over the unfused eager code — the table the notebooks print under
    :func:`plot_kernels`."""
    return [f"{r['kernel']:>22} T={r['tokens']:>6}: {r['graph_ms'] * 1e3:7.1f} µs in a graph, "
            f"{r['graph_frac_copy']:.0%} of copy bandwidth, {r['eager_ms'] / r['graph_ms']:.0f}x the unfused eager"
            for k in kernels for r in kernel_rows(doc, k)
            if all(isinstance(r.get(c), (int, float)) for c in ("graph_ms", "graph_frac_copy", "eager_ms"))]


def plot_kernels(doc: Mapping[str, Any], kernels: Sequence[str] | None = None) -> Figure:
    """``bench-kernels``: left, the fraction of copy bandwidth each kernel reaches vs T (solid ours, dashed
    torch.compile, dotted eager); right, microseconds per call inside a CUDA graph at small T against the empty
    kernel. ``kernels`` picks some of them (a notebook's family); each keeps its colour from the whole set."""
    fig = Figure(figsize=(15, 6))
    ax1, ax2 = fig.subplots(1, 2)
    small_t = 256
    for i, name in enumerate(doc["config"]["kernels"]):
        if kernels is not None and name not in kernels:
            continue
        rows = [r for r in doc.get("results", []) if r["kernel"] == name]
        c = f"C{i % 10}"
        for col, style in (("eager", ":"), ("compile", "--"), ("triton", "-")):
            pts = _points(rows, f"{col}_frac_copy")
            if pts:
                ax1.plot(*zip(*pts), style, color=c, marker="o", ms=3, label=name if col == "triton" else None)
        pts = [(r["tokens"], r["graph_ms"] * 1e3) for r in rows if isinstance(r.get("graph_ms"), (int, float))
               and r["tokens"] <= small_t]
        if pts:
            ax2.plot(*zip(*pts), "-o", color=c, label=name)
    ax1.set(xscale="log", xlabel="tokens T", ylabel="fraction of copy bandwidth",
            title="bandwidth (solid ours, dashed torch.compile, dotted eager)")
    plain_log_ticks(ax1)
    ax1.axhline(0.9, color="grey", lw=0.8)
    ax1.legend(fontsize=7)
    floor = (doc.get("roofs") or {}).get("empty_kernel_ms", {}).get("graph_ms")
    if floor is not None:
        ax2.axhline(floor * 1e3, color="k", lw=1, label="empty kernel (graph)")
        ax2.set(xscale="log", xlabel="tokens T", ylabel="µs per call inside a CUDA graph",
                title=f"small T (<= {small_t}) inside CUDA graphs")
        plain_log_ticks(ax2)
        ax2.legend(fontsize=7)
    else:
        ax2.text(0.5, 0.5, "no CUDA graphs on this device", ha="center", va="center", transform=ax2.transAxes)
        ax2.set_axis_off()
    fig.suptitle(f"gemma4lab kernels — {env_label(doc)} ({doc['config']['dtype']}, hidden "
                 f"{doc['config']['shapes']['hidden']})")
    return fig


def plot_pcg_bench(doc: Mapping[str, Any]) -> Figure:
    """``bench-pcg``: latency per forward vs tokens (eager unfused, eager fused, fused + PCG) beside the CPU's launch
    time and the GPU's busy time at 93 tokens."""
    fig = Figure(figsize=(11, 4))
    a, b = fig.subplots(1, 2)
    rows = _rows_by_tokens(doc)
    for key, label in PCG_SERIES:
        pts = _points(rows, key)
        if pts:
            a.plot(*zip(*pts), marker="o", label=label)
    a.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms per forward")
    plain_log_ticks(a)
    a.legend()
    a.grid(True, which="both", alpha=0.3)
    profs = [(k.rsplit("_", 1)[0], v) for k, v in (doc.get("profiles") or {}).items() if k.endswith("_93")]
    b.bar([n for n, _ in profs], [v["cpu_dispatch_ms"] for _, v in profs], label="CPU in launch calls")
    b.bar([n for n, _ in profs], [v["gpu_busy_ms"] for _, v in profs], alpha=0.6, label="GPU busy")
    b.set_ylabel("ms at 93 tokens")
    b.legend()
    fig.suptitle(f"PCG, {doc.get('layers', '?')}-layer 26B-A4B-width model — {env_label(doc)}")
    return fig


def plot_roofline(rows: Sequence[Mapping[str, Any]], kernel: str, label: str) -> Figure:
    """Fraction of copy bandwidth reached per implementation vs tokens (02): 1.0 is the roof for a memory-bound op."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for col, style in (("eager", ":"), ("compile", "--"), ("triton", "-"), ("graph", "-.")):
        pts = _points(rows, f"{col}_frac_copy")
        if pts:
            ax.plot(*zip(*pts), style, marker="o", ms=3, label=col)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set(xscale="log", xlabel="tokens T", ylabel="fraction of copy bandwidth", ylim=(0, 1.1),
           title=f"{kernel}\nrecorded: {label}")  # fmt: skip
    plain_log_ticks(ax)
    ax.legend()
    return fig


def plot_error_bars(errors: Mapping[str, tuple[float, float]], title: str) -> Figure:
    """Mean and max absolute error per computation, log scale (03): one rounding vs many, side by side."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    names = list(errors)
    xs = np.arange(len(names))
    ax.bar(xs - 0.2, [errors[n][0] for n in names], 0.4, label="mean |error|")
    ax.bar(xs + 0.2, [errors[n][1] for n in names], 0.4, label="max |error|")
    ax.set_xticks(list(xs), names)
    ax.set(yscale="log", ylabel="|y − float64|", title=title)
    ax.legend()
    return fig


def plot_launches(per_layer: Mapping[str, float], device: str, tokens: int) -> Figure:
    """Kernels (GPU) or dispatched ATen ops (CPU proxy) per layer for each fusion configuration (04). Horizontal
    bars, so the configuration names never overlap, each labelled with its count."""
    names = list(per_layer)
    fig = Figure(figsize=(8, 0.9 + 0.38 * len(names)))
    ax = fig.subplots()
    colors = ["C7" if n == "transformers" else "C3" if n == "unfused" else "C2" if n == "all" else "C0"
              for n in names]  # fmt: skip
    values = [per_layer[n] for n in names]
    bars = ax.barh(names, values, color=colors)
    ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], padding=3, fontsize=8)
    ax.invert_yaxis()  # first configuration on top, as in the legend of the other figures
    ax.set_xlabel("kernels per layer" if device.startswith("cuda") else "ATen ops per layer (launch proxy)")
    ax.set_xlim(0, max(values, default=1) * 1.12)
    ax.set_title(f"tiny model, {tokens} tokens, {device}")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------------ 05 and 06


def plot_pcg_latency(doc: Mapping[str, Any], title: str) -> Figure:
    """Recorded ms per forward vs tokens for eager unfused, eager fused and fused + PCG (``pcg_*.json``; 05, 06)."""
    rows = _rows_by_tokens(doc)
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for key, label in PCG_SERIES:
        pts = _points(rows, key)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms per forward", title=title)
    plain_log_ticks(ax)
    ax.title.set_fontsize(8)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    return fig


def breakdown_data(doc: Mapping[str, Any] | None) -> dict[int, dict]:
    """{tokens: {implementation: {cpu_dispatch_ms, gpu_busy_ms, latency_ms, idle_ms, kernels, launch_calls,
    graph_launches}}} for the breakdown (05).

    Read from a ``pcg_*.json`` document's profiles (keys like ``eager_fused_93``). Latency is the row's timed median,
    never the profiler's wall time (the profiler slows the host down); without it latency and idle are None. Empty
    when there is no document or it has no profiles, so the notebook falls back to its live numbers.
    """
    data: dict[int, dict] = {}
    for key, prof in (doc or {}).get("profiles", {}).items():
        name, t = key.rsplit("_", 1)
        lat = doc.get("rows", {}).get(t, {}).get(f"{name}_ms")
        data.setdefault(int(t), {})[name] = breakdown_entry(prof, lat)
    return data


def breakdown_entry(prof: Mapping[str, Any], latency_ms: float | None) -> dict[str, Any]:
    """One implementation's bars from a ``profile_forward`` summary and a separately timed latency: the GPU idles
    for ``latency − busy``, whatever the CPU's launch time is (dispatch < busy can still leave the GPU idle)."""
    busy = prof["gpu_busy_ms"]
    return {"cpu_dispatch_ms": prof["cpu_dispatch_ms"], "gpu_busy_ms": busy, "latency_ms": latency_ms,
            "idle_ms": None if latency_ms is None else idle_ms(latency_ms, busy), "kernels": prof["kernels"],
            "launch_calls": prof.get("launch_calls", prof["kernels"]), "graph_launches": prof.get("graph_launches", 0)}


def plot_pcg_speedup(doc: Mapping[str, Any], title: str) -> Figure:
    """What the graphs buy per token count (06): eager latency over PCG latency, fused and unfused, from the same
    ``pcg_*.json`` that 05 draws as latencies: the gain is large where launches dominate and fades to ~1 where
    the kernels' own time does."""
    rows = _rows_by_tokens(doc)
    pcg = dict(_points(rows, "pcg_fused_ms"))
    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    for key, style, label in (("eager_fused_ms", "C0o-", "eager fused / PCG"),
                              ("eager_unfused_ms", "C3s--", "eager unfused / PCG")):
        pts = [(t, v / pcg[t]) for t, v in _points(rows, key) if pcg.get(t, 0) > 0]
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set(xscale="log", xlabel="tokens", ylabel="speed-up of fused + PCG (×)", title=title)
    plain_log_ticks(ax)
    ax.title.set_fontsize(8)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def plot_moe_sweep(doc: Mapping[str, Any], title: str) -> Figure:
    """The expert GEMM sweep (09, ``experiments/moe_gemm_vs_grouped_mm.py --sweep``): both expert GEMMs of one layer
    vs tokens, one line per row tile and MMA orientation (its best weight tiling; dashed: ``swap_ab``) beside the
    library grouped GEMM, one panel per routing skew — where two predictions about row tiles met the measurement."""
    rows = doc.get("rows") or []
    skews = sorted({r["skew"] for r in rows})
    fig = Figure(figsize=(5.5 * max(1, len(skews)), 4))
    axes = np.atleast_1d(fig.subplots(1, max(1, len(skews)), sharey=True))
    for ax, skew in zip(axes, skews):
        mine = sorted((r for r in rows if r["skew"] == skew), key=lambda r: r["tokens"])
        best: dict[tuple[int, bool], list[tuple[int, float]]] = {}
        for r in mine:
            per_tile: dict[tuple[int, bool], float] = {}
            for g in r.get("gemm") or []:
                key = (int(re.search(r"block_m=(\d+)", g["config"]).group(1)), "swap_ab=True" in g["config"])
                per_tile[key] = min(per_tile.get(key, float("inf")), g["ms"])
            for key, ms in per_tile.items():
                best.setdefault(key, []).append((r["tokens"], ms))
        ax.plot([r["tokens"] for r in mine], [r["gemm_grouped_mm_ms"] for r in mine], "k--s", label="grouped_mm")
        tiles = sorted({bm for bm, _ in best})
        for bm, swap in sorted(best):
            ax.plot(*zip(*best[bm, swap]), "o--" if swap else "o-", color=f"C{tiles.index(bm)}",
                    label=f"moe_gemm, {bm}-row tile" + (", swapped (w·aᵀ)" if swap else ""))
        ax.set(xscale="log", yscale="log", xlabel="tokens", title=f"routing skew {skew:g}"
               + (" (uniform)" if skew == 1 else ""))
        plain_log_ticks(ax)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms, both expert GEMMs of one layer")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return fig


def plot_attention_sweep(doc: Mapping[str, Any], title: str, layer: str = "full",
                         predicted_spill: Callable[[Mapping[str, Any]], bool] | None = None) -> Figure:
    """``bench-attention --sweep``: TFLOP/s of every tile setting of one layer type, best on top, coloured by how
    many programs share a query tile (``dv_splits``); the settings ``predicted_spill`` flags are hatched, so a
    prediction about register spills can be read against the measurement (12)."""
    rows = sorted((r for r in doc.get("sweep") or [] if r["layer"] == layer), key=lambda r: r["tflops"])
    fig = Figure(figsize=(8, 0.8 + 0.32 * len(rows)))
    ax = fig.subplots()
    splits = sorted({r["dv_splits"] for r in rows})
    for i, r in enumerate(rows):
        spill = predicted_spill is not None and predicted_spill(r)
        ax.barh(i, r["tflops"], color=f"C{splits.index(r['dv_splits'])}", hatch="//" if spill else None,
                edgecolor="k" if spill else None)
    ax.set_yticks(range(len(rows)), [f"{r['block_m']}×{r['block_n']}, {r['num_warps']} warps, {r['num_stages']} "
                                     f"stage{'s' if r['num_stages'] > 1 else ''}, dv_splits {r['dv_splits']}"
                                     for r in rows], fontsize=7)
    handles = [Patch(color=f"C{i}", label=f"dv_splits {d}") for i, d in enumerate(splits)]
    if predicted_spill is not None:
        handles.append(Patch(facecolor="white", edgecolor="k", hatch="//", label="predicted to spill"))
    ax.legend(handles=handles, fontsize=7, loc="lower right")
    ax.set(xlabel="TFLOP/s (useful: 4·D per visible query-key pair)", title=title)
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def plot_timeline(profiles: Mapping[str, Mapping[str, Any]], title: str, window_ms: float | None = None) -> Figure:
    """A Gantt chart of one forward per implementation (05): every kernel a bar at its start time, coloured by
    family, so the gaps in which the GPU waits for the CPU are white space. ``profiles`` maps a label to a
    ``profile_forward(..., timeline=True)`` result; ``window_ms`` shows only the first milliseconds of each."""
    fig = Figure(figsize=(11, 0.9 + 0.75 * len(profiles)))
    ax = fig.subplots()
    colors = {fam: f"C{i}" for i, fam in enumerate(FAMILY_LABELS)}
    seen: set[str] = set()
    for row, prof in enumerate(profiles.values()):
        spans = [(start / 1e3, dur / 1e3, fam) for _, fam, start, dur in prof.get("timeline") or []
                 if window_ms is None or start / 1e3 < window_ms]
        for fam in dict.fromkeys(f for *_, f in spans):
            ax.broken_barh([(a, max(d, 1e-4)) for a, d, f in spans if f == fam], (row - 0.35, 0.7),
                           facecolors=colors.get(fam, "0.5"),
                           label=None if fam in seen else FAMILY_LABELS.get(fam, fam))
            seen.add(fam)
        if spans:
            end = max(a + d for a, d, _ in spans)
            busy = sum(d for _, d, _ in spans)
            ax.text(end, row + 0.42, f"{len(spans)} kernels, busy {busy:.2f} of {end:.2f} ms "
                                     f"({1 - busy / end:.0%} idle)" if end > 0 else "", fontsize=7, ha="right")
    ax.set_yticks(range(len(profiles)), list(profiles))
    ax.invert_yaxis()
    ax.set(xlabel="ms since the first kernel", title=title, ylim=(len(profiles) - 0.4, -0.7))
    ax.title.set_fontsize(9)
    if window_ms is not None:
        ax.set_xlim(0, window_ms)
    ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.0, -0.18), ncol=len(seen), frameon=False)
    fig.tight_layout()
    return fig


def gap_widths_us(profile: Mapping[str, Any]) -> list[float]:
    """The widths (µs) of the gaps between consecutive kernels of a ``profile_forward(..., timeline=True)`` result
    (``profiling.kernel_gaps``): where the GPU waited."""
    from gemma4lab.lab.profiling import kernel_gaps

    return [w for w, _, _ in kernel_gaps((n, a, a + d) for n, _, a, d in profile.get("timeline") or [])]


def plot_gaps(profiles: Mapping[str, Mapping[str, Any]], title: str, split_us: float = 5.0) -> Figure:
    """How wide the GPU's waits are (05): a histogram of the gaps between kernels per implementation, on a log
    axis, with the total time in gaps narrower and wider than ``split_us`` in the legend — inside a CUDA graph a
    gap is the graph's own scheduling (sub-microsecond), a wide one is the host."""
    fig = Figure(figsize=(8, 3.6))
    ax = fig.subplots()
    widths = {name: gap_widths_us(prof) for name, prof in profiles.items()}
    every = [w for ws in widths.values() for w in ws if w > 0]
    if every:
        bins = np.logspace(np.log10(min(every)), np.log10(max(every)) + 1e-9, 40)
        for i, (name, ws) in enumerate(widths.items()):
            small = sum(w for w in ws if w < split_us) / 1e3
            wide = sum(w for w in ws if w >= split_us) / 1e3
            ax.hist([w for w in ws if w > 0], bins=bins, histtype="step", lw=1.5, color=f"C{i}",
                    label=f"{name}: {len(ws)} gaps, < {split_us:g} µs: {small:.2f} ms, wider: {wide:.2f} ms")
        ax.axvline(split_us, color="0.5", ls=":", lw=1)
        ax.set_xscale("log")
        ax.legend(fontsize=7, frameon=False)
    ax.set(xlabel="gap between consecutive kernels (µs)", ylabel="gaps", title=title)
    ax.title.set_fontsize(9)
    fig.tight_layout()
    return fig


def plot_breakdown(impls: Mapping[str, Mapping[str, Any]], tokens: int, source: str) -> Figure:
    """Per implementation at one token count (05): a stacked bar of GPU busy + GPU idle (= latency) beside the CPU's
    time inside launch calls. The idle share is the launch overhead the GPU pays; kernels are counted apart from
    the CPU's launch calls (a CUDA graph runs many kernels per launch)."""
    fig = Figure(figsize=(7.5, 4))
    ax = fig.subplots()
    names = list(impls)
    xs = np.arange(len(names))
    busy = [impls[n]["gpu_busy_ms"] or 0 for n in names]
    idle = [impls[n].get("idle_ms") or 0 for n in names]
    ax.bar(xs - 0.2, busy, 0.4, label="GPU busy", color="C0")
    ax.bar(xs - 0.2, idle, 0.4, bottom=busy, label="GPU idle (latency − busy)", color="C3", alpha=0.7)
    ax.bar(xs + 0.2, [impls[n]["cpu_dispatch_ms"] or 0 for n in names], 0.4, label="CPU in launch calls",
           color="C7")
    labels = []
    for n in names:
        e = impls[n]
        launches = f"{e.get('launch_calls', e['kernels'])} launches"
        if e.get("graph_launches"):
            launches += f" + {e['graph_launches']} graphs"
        labels.append(f"{n}\n{e['kernels']} kernels\n{launches}")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set(ylabel="ms", title=f"T = {tokens} tokens — {source}")
    ax.title.set_fontsize(8)
    ax.legend(fontsize=8)
    return fig


def plot_padding_waste(tokens: Sequence[int], waste: Sequence[float], title: str = "padding waste") -> Figure:
    """Fraction of each padded bucket that is padding, vs prompt length (06): what the bucket choice costs."""
    fig = Figure(figsize=(7, 3.2))
    ax = fig.subplots()
    ax.plot(tokens, waste)
    ax.set(xscale="log", xlabel="prompt tokens", ylabel="padding fraction", title=title)
    plain_log_ticks(ax)
    ax.grid(True, which="both", alpha=0.3)
    return fig


# ------------------------------------------------------------------------------------------------------------ 08


def plot_prefill(published: Mapping[int, tuple[float, float]], rows: Sequence[Mapping[str, Any]],
                 label: str | None) -> Figure:  # fmt: skip
    """Published baseline / fused+PCG ms per prefill beside our recorded rows (08), on log-log axes; with rows, a
    second panel of speed-ups: our fused + PCG against the published fused + PCG (where the token counts match)
    and against the best peer of the same run. The legend sits outside the axes so it hides no point.

    ``published`` maps tokens to (baseline, fused + PCG) ms; ``rows`` are a ``prefill_*.json``'s rows (may be empty,
    then only the published lines are drawn); ``label`` names the card and date ours were measured on.
    """
    rows = sorted(rows, key=lambda r: r["tokens"])
    fig = Figure(figsize=(11, 4.6) if rows else (8, 4.5))
    ax, *rest = fig.subplots(1, 2, width_ratios=(3, 2)) if rows else (fig.subplots(),)
    ts = list(published)
    ax.plot(ts, [v[0] for v in published.values()], "k--", marker="s", alpha=0.5, label="published baseline")
    ax.plot(ts, [v[1] for v in published.values()], "k-", marker="s", alpha=0.5, label="published fused + PCG")
    for key, style, name in PREFILL_SERIES:
        pts = _points(rows, key)
        if pts:
            ax.plot(*zip(*pts), style, label=name)
    ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="ms per prefill",
           title="Gemma 4 26B-A4B prefill" + (f"\nours recorded on {label}" if label else "\n(published only)"))
    plain_log_ticks(ax)
    ax.title.set_fontsize(9)
    ax.grid(True, which="both", alpha=0.3)
    if not rows:
        ax.legend(fontsize=8)
        return fig
    fig.legend(*ax.get_legend_handles_labels(), fontsize=7, loc="lower center", ncol=4, frameon=False)
    (sp,) = rest
    vs_pub = [(t, published[t][1] / ms) for t, ms in _points(rows, "pcg_ms") if t in published and ms > 0]
    vs_peer = _points(rows, "speedup_vs_best_peer")
    if vs_pub:
        sp.plot(*zip(*vs_pub), "C2o-", label="vs published fused + PCG")
    if vs_peer:
        sp.plot(*zip(*vs_peer), "C0s--", label="vs best peer, same run")
    sp.axhline(1.0, color="k", lw=0.8)
    sp.set(xscale="log", xlabel="prompt tokens", ylabel="speed-up of our fused + PCG (×)",
           title="speed-up (> 1: ours faster)")
    plain_log_ticks(sp)
    sp.title.set_fontsize(9)
    sp.grid(True, which="both", alpha=0.3)
    if sp.get_lines()[1:]:  # beyond the 1.0 line
        sp.legend(fontsize=7)
    fig.subplots_adjust(bottom=0.27, wspace=0.3)
    return fig


def plot_families(rows: Sequence[Mapping[str, Any]], title: str, key: str = "families") -> Figure:
    """``bench-prefill --parts families``: one panel per token count, ours (GPU time by op family, then idle time up
    to the latency) stacked beside the op-level floor by family (hatched). Each panel has its own scale, so the
    shares read at every length; rows without a profile under ``key`` are left out."""
    rows = sorted((r for r in rows if isinstance(r.get(key), Mapping)), key=lambda r: r["tokens"])
    fig = Figure(figsize=(2.2 * max(1, len(rows)) + 2.4, 4.2))
    axes = fig.subplots(1, max(1, len(rows)), squeeze=False)[0]
    for ax, r in zip(axes, rows):
        prof = r[key]
        for x, field, hatch in ((0, "gpu_ms", None), (1, "floor_ms", "//")):
            bottom = 0.0
            for i, (fam, label) in enumerate(FAMILY_LABELS.items()):
                v = prof[fam][field]
                ax.bar(x, v, 0.7, bottom=bottom, color=f"C{i}", hatch=hatch, label=label if x == 0 else None)
                bottom += v
        ax.bar(0, prof["idle_ms"], 0.7, bottom=sum(prof[f]["gpu_ms"] for f in FAMILY_LABELS), color="lightgrey",
               label="GPU idle")
        ax.set_xticks([0, 1], ["ours", "floor"])
        ax.set_title(f"{r['tokens']} tokens", fontsize=9)
    axes[0].set_ylabel("ms per prefill")
    if rows:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=8)
    else:
        axes[0].text(0.5, 0.5, "no profile by family recorded", ha="center", va="center", transform=axes[0].transAxes)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(right=0.98 - 1.3 / fig.get_figwidth(), wspace=0.35)
    return fig


def plot_layer_errors(per_layer: Mapping[str, Any], title: str) -> Figure:
    """Teacher-forced bf16 error of every decoder layer against its fp32 twin, ours beside transformers (``bench-
    prefill --parts accuracy``): a per-layer view in which a defect in one layer's kernels cannot hide."""
    fig = Figure(figsize=(9, 3.6))
    ax = fig.subplots()
    series = [("ours_fused", "ours, fused (bf16)", "C2"), ("ours_unfused", "ours, unfused (bf16)", "C3"),
              ("transformers", "transformers (bf16)", "C7"), ("ours_fused_fp8", "ours, fused, FP8 experts", "C1"),
              ("ours_fused_fp8a8", "ours, fused, FP8 experts + activations", "C4")]
    series = [s for s in series if per_layer.get(s[0])]
    width = 0.8 / max(len(series), 1)
    for j, (key, label, color) in enumerate(series):
        errs = per_layer[key]
        ax.bar(np.arange(len(errs)) + (j - (len(series) - 1) / 2) * width, errs, width, label=label, color=color)
    ax.set(yscale="log", xlabel="decoder layer", ylabel="‖bf16 − fp32‖ / ‖fp32‖ (layer output)", title=title)
    ax.title.set_fontsize(8)
    ax.legend(fontsize=8)
    return fig


ATTENTION_SERIES = (("triton", "gemma4lab Triton kernel"), ("flex", "FlexAttention (compiled)"),
                    ("sdpa", "best SDPA backend (masked)"))


def plot_attention(rows: Sequence[Mapping[str, Any]], title: str, matmul_tflops: float | None = None) -> Figure:
    """TFLOP/s (visible pairs only) vs tokens, one panel per layer type (``attention_*.json``; bench-attention)."""
    layers = [name for name in ("full", "sliding") if any(r["layer"] == name for r in rows)]
    fig = Figure(figsize=(5.5 * max(1, len(layers)), 4))
    axes = fig.subplots(1, max(1, len(layers)), squeeze=False)[0]
    for ax, layer in zip(axes, layers):
        mine = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["tokens"])
        for key, label in ATTENTION_SERIES:
            pts = _points(mine, f"{key}_tflops")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        if matmul_tflops:
            ax.axhline(matmul_tflops, color="gray", ls="--", lw=1, label="bf16 matmul (same run)")
        head = mine[0]["head_dim"] if mine else "?"
        ax.set(xscale="log", xlabel="tokens", ylabel="TFLOP/s (visible pairs)", title=f"{layer} layers (head {head})")
        plain_log_ticks(ax)
        ts = [r["tokens"] for r in mine]
        ax.set_xticks(ts, [str(t) for t in ts])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    return fig


#: matplotlib colour of each ``bench-decode`` mode (labels: ``gemma4lab.lab.report.DECODE_MODES``)
_DECODE_COLOR = {"eager": "C3", "graph": "C2"}


def plot_decode(doc: Mapping[str, Any], label: str) -> Figure:
    """``bench-decode``: one column per context, ms per step (top, log) and tokens/s (bottom) against batch, each mode's
    step (solid) and loop (dashed) beside the floor with the experts seen (black) and expected (grey). Points the
    runner could not run are simply absent; the report says why."""
    rows = sorted((doc.get("rows") or {}).values(), key=lambda r: (r["context"], r["batch"]))
    contexts = sorted({r["context"] for r in rows})
    names = {m: name + ("" if m == "eager" or doc.get("graphs", True) else " (no CUDA: eager fallback)")
             for m, name in DECODE_MODES}
    fig = Figure(figsize=(4.2 * max(1, len(contexts)), 6.4))
    axes = fig.subplots(2, max(1, len(contexts)), squeeze=False, sharex=True)
    for j, ctx in enumerate(contexts):
        mine = [r for r in rows if r["context"] == ctx]
        top, bottom = axes[0][j], axes[1][j]
        series = [(f"{name} {part}", [(r["batch"], r[mode][f"{part}_ms"]) for r in mine
                                      if isinstance(r.get(mode), Mapping) and r[mode].get(f"{part}_ms")],
                   f"{_DECODE_COLOR[mode]}o{'-' if part == 'step' else '--'}")
                  for mode, name in names.items() for part in ("step", "loop")]
        series += [(f"floor ({what})", [(r["batch"], r[f"floor_{key}"]["floor_ms"]) for r in mine
                                        if isinstance(r.get(f"floor_{key}"), Mapping)], style)
                   for key, what, style in (("observed", "experts seen", "k:"), ("expected", "random routing", "C7:"))]
        for name, pts, style in series:
            if pts:
                top.plot(*zip(*pts), style, label=name)
                bottom.plot([b for b, _ in pts], [b / v * 1e3 for b, v in pts], style, label=name)
        top.set_title(f"context {ctx}", fontsize=9)
        batches = [r["batch"] for r in mine]
        top.set_yscale("log")  # eager, graph and floor differ by orders of magnitude at small batches
        plain_log_ticks(top, "y")
        bottom.set_ylim(bottom=0)
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.grid(True, which="both", alpha=0.3)
        bottom.set_xlabel("batch (sequences)")
    axes[0][0].set_ylabel("ms per step (= per output token)")
    axes[1][0].set_ylabel("tokens/s")
    if rows:
        axes[0][0].legend(fontsize=7)
    else:
        axes[0][0].text(0.5, 0.5, "no decode point recorded", ha="center", va="center", transform=axes[0][0].transAxes)
    fig.suptitle(f"Gemma 4 decode ({doc.get('preset', '?')}, {doc.get('layers', '?')} layers) — {label}", fontsize=9)
    return fig


# ------------------------------------------------------------------------------------------------------------ 13


def dense_fixed_cost(doc: Mapping[str, Any], rows: int = 1, max_bytes: float = 1e8) -> dict[str, float]:
    """Least-squares line ``µs = fixed + bytes / bandwidth`` through cuBLAS's times at ``rows`` rows in a dense
    sweep (``experiments/dense_small_m.py``), over the weights below ``max_bytes`` (the layer projections, not the
    1.5 GB head): ``fixed_us`` is what a GEMM costs whatever its size, ``bandwidth_Bps`` the slope's stream rate."""
    pts = [(r["weight_bytes"], r["cublas_ms"] * 1e3) for r in doc.get("rows", [])
           if r["rows"] == rows and r["weight_bytes"] < max_bytes]
    if len(pts) < 2:
        raise ValueError(f"a dense sweep with at least two weights below {max_bytes:.0e} bytes at {rows} rows is "
                         f"needed, got {len(pts)}")
    slope, fixed = np.polyfit([b for b, _ in pts], [t for _, t in pts], 1)
    return {"fixed_us": float(fixed), "bandwidth_Bps": float(1e6 / slope) if slope > 0 else float("inf"),
            "points": len(pts)}


def plot_dense_sweep(doc: Mapping[str, Any], label: str, rows: int = 1) -> Figure:
    """Each dense projection of the sweep at ``rows`` rows: cuBLAS and the best ``dense_gemm`` setting against the
    weight's size, beside its bytes over the run's copy bandwidth and the fitted line of :func:`dense_fixed_cost`;
    the gap between the floor and the points at small weights is a GEMM's fixed cost."""
    mine = sorted((r for r in doc.get("rows", []) if r["rows"] == rows and r["weight_bytes"] < 1e8),
                  key=lambda r: r["weight_bytes"])
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    mb = [r["weight_bytes"] / 1e6 for r in mine]
    ax.plot(mb, [r["cublas_ms"] * 1e3 for r in mine], "C0o", label="cuBLAS (F.linear)")
    best = [(r["weight_bytes"] / 1e6, r["best"]["ms"] * 1e3) for r in mine if isinstance(r.get("best"), Mapping)]
    if best:
        ax.plot(*zip(*best), "C1s", label="dense_gemm, best setting")
    bw = doc.get("copy_bandwidth_Bps")
    xs = np.linspace(0, max(mb, default=1) * 1.05, 50)
    if isinstance(bw, (int, float)) and bw > 0:
        ax.plot(xs, xs * 1e6 / bw * 1e6, "k:", label=f"bytes / copy bandwidth ({bw / 1e12:.2f} TB/s)")
    if len(mine) >= 2:
        fit = dense_fixed_cost(doc, rows)
        ax.plot(xs, fit["fixed_us"] + xs * 1e6 / fit["bandwidth_Bps"] * 1e6, "C0--", alpha=0.6,
                label=f"cuBLAS fit: {fit['fixed_us']:.1f} µs + bytes / {fit['bandwidth_Bps'] / 1e12:.2f} TB/s")
    for r in mine:
        ax.annotate(r["shape"], (r["weight_bytes"] / 1e6, r["cublas_ms"] * 1e3), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("weight (MB, bf16)")
    ax.set_ylabel(f"µs per GEMM at {rows} row{'s' if rows > 1 else ''} (in a CUDA graph)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"Dense projections of Gemma 4 26B-A4B at {rows} row{'s' if rows > 1 else ''} — {label}", fontsize=9)
    return fig
