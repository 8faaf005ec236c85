"""What the kernel tests share: inputs, float64 oracles written from the Hugging Face formulas (independent of the
package's ``_ref`` twins), and an elementwise tolerance derived from the output's own rounding.

The fixtures ``gen`` and ``triton_path_only`` (use it with ``pytestmark = pytest.mark.usefixtures(...)``: it skips
or fails a module whose Triton code would not run) live in ``tests/conftest.py``.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-6
BF16, FP32, FP16 = torch.bfloat16, torch.float32, torch.float16
#: The largest relative error of one rounding to each dtype (half an ulp at the bottom of a binade).
UNIT = {BF16: 2.0**-8, FP16: 2.0**-11, FP32: 2.0**-24}
#: fp32 arithmetic inside the kernels (norm reductions over thousands of elements, RoPE's subtraction) adds error of
#: this order relative to the largest value of the output; one rounding of the output comes on top.
FP32_MATH = 2e-6
# dtype, T, hidden: hidden sizes not powers of two; T = 33 leaves a partial row block, T = 32 fills them exactly.
ROW_CASES = [(dt, n, h) for dt in (FP32, BF16) for n, h in ((1, 96), (33, 200))] + [(BF16, 32, 96)]


def act(gen, *shape, dtype=FP32, scale=1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=gen)).to(dtype)


def wt(gen, n, dtype=FP32) -> torch.Tensor:
    return (1 + 0.1 * torch.randn(n, generator=gen)).to(dtype)


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def d(*ts):
    return [t.double() for t in ts]


def assert_rounded(got: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, roundings: float = 1.0,
                   math_err: float = FP32_MATH) -> None:
    """Every element of ``got`` within ``roundings`` roundings to ``dtype`` of the float64 ``exact`` value, plus the
    fp32 arithmetic's error (relative to the output's largest value). NaN never passes; a bad row cannot hide
    behind a norm over the whole tensor."""
    assert got.shape == exact.shape, (got.shape, exact.shape)
    assert torch.isfinite(got).all(), "non-finite output (an unwritten, poisoned element?)"
    exact = exact.double()
    torch.testing.assert_close(got.double(), exact, rtol=roundings * UNIT[dtype] * (1 + 1e-6),
                               atol=math_err * float(exact.abs().max()) + 1e-30)


# ---- float64 oracles ------------------------------------------------------------------------------------------
def rms64(x, w=None):
    y = x * (x.pow(2).mean(-1, keepdim=True) + EPS).rsqrt()
    return y if w is None else y * w


def oracle_rms_res(x, w, r, s):
    return (rms64(x, w) + r) * s.reshape(())


def oracle_dual(x1, w1, x2, w2, w3, r, s):
    return (rms64(rms64(x1, w1) + rms64(x2, w2), w3) + r) * s.reshape(())


def oracle_dual_next(x1, w1, x2, w2, w3, r, s, wn, dtype):
    out = oracle_dual(x1, w1, x2, w2, w3, r, s)
    return out, rms64(out.to(dtype).double(), wn)  # next_in is computed from the rounded residual stream


def oracle_post_attention(a, r, wpa, w1, w2, ws, dtype):
    h = r + rms64(a, wpa)
    hr = h.to(dtype).double()  # the residual stream is rounded once; the views read it back
    return h, rms64(hr, w1), rms64(hr, w2), rms64(hr) * ws * a.shape[-1] ** -0.5


def oracle_rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def oracle_router(logits, scale, k):
    p = torch.softmax(logits, -1)
    w, ids = torch.topk(p, k, -1)
    return w / w.sum(-1, keepdim=True) * scale[ids], ids


def oracle_gelu_mul(g, u):
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3))) * u


def dual_inputs(gen, n, h, dtype):
    return [act(gen, n, h, dtype=dtype), wt(gen, h, dtype), act(gen, n, h, dtype=dtype, scale=3.0), wt(gen, h, dtype),
            wt(gen, h, dtype), act(gen, n, h, dtype=dtype), torch.tensor([0.6])]


def rope_tables(gen, n, dim, proportional=False, dtype=FP32):
    if proportional:  # Gemma's proportional RoPE: only the first quarter of the frequencies rotate
        ang = torch.rand(n, dim // 2, generator=gen) * 6.28
        ang[:, dim // 8 :] = 0
        ang = torch.cat((ang, ang), -1)
        return ang.cos().to(dtype), ang.sin().to(dtype)
    return act(gen, n, dim).to(dtype), act(gen, n, dim).to(dtype)  # arbitrary tables test the arithmetic harder


def routed_case(t, k, n_experts, h=96, i=40, seed=0, dtype=FP32, device="cpu", skew=1.0):
    """Token rows and router-like ids (k distinct experts per token; ``skew`` > 1 favours low expert numbers)."""
    g = torch.Generator().manual_seed(seed)
    pref = torch.rand(t, n_experts, generator=g) ** skew * torch.arange(n_experts, 0, -1) ** (skew - 1)
    ids = pref.topk(k, dim=-1).indices
    x = torch.randn(t, h, generator=g).to(dtype)
    w = (0.1 * torch.randn(n_experts, 2 * i, h, generator=g)).to(dtype)
    wd = (0.1 * torch.randn(n_experts, h, i, generator=g)).to(dtype)
    return [v.to(device) for v in (x, ids, w, wd)]
