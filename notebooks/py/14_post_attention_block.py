# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py//py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 14 · The post-attention block: one residual update, three normed views, one pass
#
# After attention's output projection, a Gemma 4 MoE layer adds the normed attention output to the residual stream
# and then needs the new stream three more times, each normed with its own weight: as the dense MLP's input, as the
# experts' input, and as the router's input. Unfused, that is four RMSNorms, an add and a scale, each reading the
# stream again. This notebook derives the package's `post_attention_block` kernel from that code, with its bytes, a
# kernel written here, the one subtlety that keeps it bit-compatible (the views come from the *rounded* stream), and
# the H200's measurement.
#
# **What you will learn**
#
# - what the block computes and where the unfused code spends its launches and bytes;
# - why the three views must be computed from the stream *after* rounding it to the activation dtype;
# - a one-pass kernel, checked against the model's own code, and what the H200 measured.

# %% tags=["parameters"]
DEVICE = "cpu"  # "cuda" for compiled kernels
INTERACTIVE = True
DTYPE = "float32"
TOKENS = 24

# %%
from gemma4lab.lab import notebook

ROOT = notebook.setup(DEVICE)  # on CPU: TRITON_INTERPRET=1, before any kernel is imported
RESULTS = ROOT / "results"

# %matplotlib inline
import inspect

import torch
import triton
import triton.language as tl
from IPython.display import display

import gemma4lab
import gemma4lab.kernels as K
from gemma4lab.kernels import post_attention_block as pab_module
from gemma4lab.lab import viz
from gemma4lab.lab.profiling import profile_forward
from gemma4lab.model.layers import rms_norm

dtype = getattr(torch, DTYPE)
torch.set_grad_enabled(False)

# %% [markdown]
# ## The unfused block
#
# The model's own code with fusion off (`gemma4lab.model.decoder.DecoderLayer.post_attention`):

# %%
model = gemma4lab.random_init("tiny", dtype=dtype, device=DEVICE)
layer = model.language_model.layers[0]
H = model.config.text.hidden_size
g = torch.Generator().manual_seed(0)
attn_out = torch.randn(TOKENS, H, generator=g).to(DEVICE, dtype)
residual = torch.randn(TOKENS, H, generator=g).to(DEVICE, dtype)


def block_unfused(a, r):
    h = r + layer.post_attention_layernorm(a)
    return h, layer.pre_feedforward_layernorm(h), layer.pre_feedforward_layernorm_2(h), layer.router.router_input(h)


ref = block_unfused(attn_out, residual)
prof = profile_forward(lambda: block_unfused(attn_out, residual))
print(f"unfused: {prof['kernels']} launches for one block")

# %% [markdown]
# ## Bytes, and the prediction
#
# One pass must read the attention output and the residual and write the stream and its three views: six rows of
# `H` activations per token, plus four weight vectors loaded once per program. Unfused, every norm reads `h` again
# and writes a row, and each norm itself is several launches with intermediates in fp32.

# %%
real_h = gemma4lab.Gemma4Config.preset("26b-a4b").text.hidden_size
fused_bytes = 6 * real_h * 2
print(f"fused, bf16, hidden {real_h}: {fused_bytes / 1e3:.1f} KB per token")
notebook.check(abs(fused_bytes - 33_792) < 1, "the kernel docstring's 33.8 KB per token")

# %% [markdown]
# **Prediction.** Memory-bound (a few flops per byte): from a few thousand tokens on the fused kernel should stream at
# ~90 % of copy bandwidth, like the other row kernels; at 93 tokens (3 MB) its launch dominates.
#
# ## The subtlety: views of the rounded stream
#
# The unfused model rounds `h` to the activation dtype when it stores it, and every norm reads that rounded `h`
# back. A fused kernel holds `h` in fp32 registers; if it normed the *unrounded* value, its three views would differ
# from the model's in the last bit for a sizeable share of the elements, and a fused model would no longer equal the
# unfused one. In bf16 (plain torch), the share:

# %%
a16, r16 = attn_out.bfloat16(), residual.bfloat16()
h32 = r16.float() + rms_norm(a16.float(), layer.post_attention_layernorm.weight.float(), 1e-6)
h16 = h32.bfloat16()
w = layer.pre_feedforward_layernorm.weight.float()
from_rounded = rms_norm(h16.float(), w, 1e-6).bfloat16()
from_unrounded = rms_norm(h32, w, 1e-6).bfloat16()
differ = (from_rounded != from_unrounded).float().mean().item()
print(f"bf16: {differ:.1%} of the MLP input's elements differ when normed from the unrounded stream")

# %% [markdown]
# So the kernel rounds `h` first (store it, and keep the rounded value in registers), then norms *that*.
#
# ## A kernel in one pass
#
# One program per token row: the row's attention output and residual in, `h` out (rounded), then one `rsqrt` of the
# rounded `h` shared by the three views, each with its own weight (the router's with `hidden^-½` folded in).

# %%
@triton.jit
def block_kernel(a_ptr, r_ptr, wpa_ptr, w1_ptr, w2_ptr, ws_ptr, h_ptr, m_ptr, e_ptr, router_ptr, eps, root,
                 H: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    a = tl.load(a_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    wpa = tl.load(wpa_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    h = r + a * tl.rsqrt(tl.sum(a * a, axis=0) / H + eps) * wpa
    h = h.to(h_ptr.dtype.element_ty)  # round first: the views are of the stored stream
    tl.store(h_ptr + row * H + cols, h, mask=mask)
    hf = h.to(tl.float32)
    normed = hf * tl.rsqrt(tl.sum(hf * hf, axis=0) / H + eps)
    w1 = tl.load(w1_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    w2 = tl.load(w2_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    ws = tl.load(ws_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(m_ptr + row * H + cols, (normed * w1).to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(e_ptr + row * H + cols, (normed * w2).to(e_ptr.dtype.element_ty), mask=mask)
    tl.store(router_ptr + row * H + cols, (normed * ws * root).to(router_ptr.dtype.element_ty), mask=mask)


outs = [torch.full_like(attn_out, float("nan")) for _ in range(4)]  # poisoned: every element must be written
block_kernel[(TOKENS,)](attn_out, residual, layer.post_attention_layernorm.weight,
                        layer.pre_feedforward_layernorm.weight, layer.pre_feedforward_layernorm_2.weight,
                        layer.router.scale, *outs, 1e-6, H**-0.5, H=H, BLOCK=triton.next_power_of_2(H))
tol = {"rtol": 1e-5, "atol": 1e-5}
for name, got, want in zip(("h", "mlp_in", "experts_in", "router_in"), outs, ref):
    torch.testing.assert_close(got, want, **tol, msg=lambda m, name=name: f"{name}: {m}")
print("the one-pass kernel equals the model's unfused block (h and its three views)")

# %% [markdown]
# ## The package's kernel
#
# `gemma_post_attention_block` is this kernel in the row family's persistent layout (notebooks 02–03): a grid of
# a few programs per SM looping over rows with a software pipeline, the four weights loaded once per program, the
# same launch settings as every row kernel (and short launches unpipelined). Its body:

# %%
print(inspect.getsource(pab_module._post_attention_kernel.fn))  # .fn: the Python function under @triton.jit

# %%
mine = K.gemma_post_attention_block(attn_out, residual, layer.post_attention_layernorm.weight,
                                    layer.pre_feedforward_layernorm.weight, layer.pre_feedforward_layernorm_2.weight,
                                    layer.router.scale)
for got, want in zip(mine, outs):
    torch.testing.assert_close(got, want, **tol)
prof_fused = profile_forward(lambda: K.gemma_post_attention_block(
    attn_out, residual, layer.post_attention_layernorm.weight, layer.pre_feedforward_layernorm.weight,
    layer.pre_feedforward_layernorm_2.weight, layer.router.scale))
print(f"the package's kernel equals the notebook's; {prof_fused['kernels']} launch (was {prof['kernels']})")
assert prof_fused["kernels"] == 1

# %% [markdown]
# ## Measured on an H200
#
# `bench-kernels` at the real hidden size, in and out of CUDA graphs, against the unfused code and `torch.compile`:

# %%
rec = viz.load_recorded("kernels", RESULTS)
if rec:
    doc, label = rec
    display(viz.plot_kernels(doc, kernels=("post_attention_block",)))
    print("\n".join(viz.kernel_lines(doc, ["post_attention_block"])))
    big = [r["graph_frac_copy"] for r in viz.kernel_rows(doc, "post_attention_block") if r["tokens"] >= 2893]
    notebook.check(min(big) >= 0.85, f"≈ 90 % of copy bandwidth from 2893 tokens on ({label})")
else:
    print("No recorded results/kernels_*.json: run `python -m gemma4lab bench-kernels` on a GPU.")

# %% [markdown]
# ## Exercise
#
# **The unfused bytes.** Count what the unfused block moves per token in bf16 at hidden 2816, assuming each RMSNorm
# reads its input once and writes its output once, and the add reads two rows and writes one: the post-attention norm
# (read `a`, write the normed row), the add (read it and the residual, write `h`), then three norms of `h` (read `h`,
# write a view, each). Set `unfused_bytes`; the check compares it with the fused kernel's.

# %%
unfused_bytes = None  # your answer: bytes per token

# %% jupyter={"source_hidden": true} tags=["solution"]
if unfused_bytes is None:
    row = real_h * 2
    unfused_bytes = 2 * row + 3 * row + 3 * 2 * row  # norm(a): 2 rows; add: 3 rows; three norms of h: 2 rows each

# %%
print(f"unfused ≥ {unfused_bytes / 1e3:.1f} KB per token against {fused_bytes / 1e3:.1f} KB fused "
      f"({unfused_bytes / fused_bytes:.2f}x) — before the fp32 intermediates each unfused norm adds")
notebook.check(unfused_bytes == 11 * real_h * 2, "11 rows against the fused kernel's 6")
