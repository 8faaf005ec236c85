"""The vision tower and projector against transformers' ``Gemma4ForConditionalGeneration`` (eager attention).

One tiny HF model is built with random, deliberately non-trivial vision weights (norm weights away from 1, a
random standardisation) and its state dict is loaded into ours by name, which is itself the key-compatibility test.
"""

from __future__ import annotations

import copy

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from conftest import random_vision_tower

from gemma4lab import Fusion
from gemma4lab.model.config import Gemma4Config, VisionConfig
from gemma4lab.model.processor import Gemma4Processor
from gemma4lab.model.vision import MultimodalEmbedder, VisionTower, image_features

transformers = pytest.importorskip("transformers")

FP32_RTOL = 1e-5
# bf16 tolerance vs the fp32 reference. Vision attention has scale 1.0 on RMS-normed q/k, so its logits are
# O(‖w_q‖·‖w_k‖·head_dim): bf16 rounding of q and k moves them by O(1e-2) and sharp softmaxes amplify that. With the
# q/k norm weights drawn below the reference's own bf16 run lands at ~6e-3; we must be no worse than it.
BF16_RTOL = 2e-2
MAX_SOFT_TOKENS = 70  # the smallest budget the reference accepts: 630 patches per image


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def cfg() -> Gemma4Config:
    return Gemma4Config.preset("tiny")


@pytest.fixture(scope="module")
def hf_model(cfg):
    torch.manual_seed(0)
    hc = transformers.Gemma4Config(**cfg.to_hf_dict())
    hc._attn_implementation = "eager"
    model = transformers.Gemma4ForConditionalGeneration(hc).eval()
    assert model.model.vision_tower.config._attn_implementation == "eager"
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        vt = model.model.vision_tower
        for name, p in vt.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(torch.rand(p.shape, generator=g) * 0.4 + 0.2)
            elif p.ndim == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "position_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        vt.std_bias.copy_(torch.randn(vt.std_bias.shape, generator=g))
        vt.std_scale.copy_(torch.rand(vt.std_scale.shape, generator=g) * 1.5 + 0.5)
        w = model.model.embed_vision.embedding_projection.weight
        w.copy_(torch.randn(w.shape, generator=g) * w.shape[-1] ** -0.5)
    return model


def _substate(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def ours(cfg, hf_model) -> tuple[VisionTower, MultimodalEmbedder]:
    tower, embedder = VisionTower(cfg.vision), MultimodalEmbedder.from_config(cfg)
    tower.load_state_dict(_substate(hf_model, "model.vision_tower."), strict=True)
    embedder.load_state_dict(_substate(hf_model, "model.embed_vision."), strict=True)
    return tower.eval(), embedder.eval()


@pytest.fixture(scope="module")
def batch(cfg) -> dict:
    """Five images of different sizes and modes in one padded batch."""
    rng = np.random.default_rng(0)

    def rgb(h: int, w: int) -> PIL.Image.Image:
        return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    images = [rgb(96, 144), rgb(150, 90), rgb(200, 200), rgb(120, 260).convert("L"), rgb(333, 111).convert("RGBA")]
    return Gemma4Processor(cfg, MAX_SOFT_TOKENS).preprocess_images(images)


# ---- weights ------------------------------------------------------------------------------------------------------


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_state_dict_keys_and_shapes_match_reference(cfg, hf_model, ours):
    tower, embedder = ours
    assert _shapes(tower.state_dict()) == _shapes(_substate(hf_model, "model.vision_tower."))
    assert _shapes(embedder.state_dict()) == _shapes(_substate(hf_model, "model.embed_vision."))
    assert not [k for k in tower.state_dict() if "inv_freq" in k]  # computed from the config, never loaded


def test_no_standardize_buffers_without_standardize():
    vc = VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, head_dim=24,
                      position_embedding_size=64, standardize=False)
    hf_cfg = Gemma4Config(vision=vc).to_hf_dict()["vision_config"]
    ref = transformers.models.gemma4.modeling_gemma4.Gemma4VisionModel(transformers.Gemma4VisionConfig(**hf_cfg))
    assert _shapes(VisionTower(vc).state_dict()) == _shapes(ref.state_dict())


def test_head_dim_must_split_into_two_rotary_axes():
    with pytest.raises(ValueError, match="multiple of 4"):
        VisionTower(VisionConfig(hidden_size=48, num_attention_heads=2, head_dim=22))


# ---- numerics -----------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_soft_tokens_match_reference_fp32(hf_model, ours, batch):
    ref = hf_model.model.vision_tower(batch["pixel_values"], batch["image_position_ids"]).last_hidden_state
    out = ours[0](batch["pixel_values"], batch["image_position_ids"])
    assert out.shape == ref.shape == (sum(batch["num_soft_tokens"]), 48)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) <= FP32_RTOL


@pytest.mark.parametrize("fusion", [Fusion.all(), Fusion(qkv_norm_rope=True), Fusion(post_attention=True, gelu=True),
                                    Fusion(epilogue=True), Fusion(epilogue=True, next_norm=True)], ids=str)
@torch.no_grad()
def test_fused_encoder_matches_reference_fp32(hf_model, ours, batch, fusion, triton_path_only):
    """The encoder layer with the decoder's fused kernels (q/k/v norms + 2-D RoPE in one kernel, the norm sandwiches
    in ``norm_residual_norm``, the gated GELU, the epilogue with the next layer's input norm) against transformers'
    tower in fp32, as tight as the unfused path: the same math, fewer roundings."""
    tower = ours[0]
    try:
        tower.encoder.fusion = fusion
        out = tower(batch["pixel_values"], batch["image_position_ids"])
    finally:
        tower.encoder.fusion = Fusion()
    ref = hf_model.model.vision_tower(batch["pixel_values"], batch["image_position_ids"]).last_hidden_state
    assert rel_err(out, ref) <= FP32_RTOL


def test_fused_encoder_layer_launches_at_most_15_kernels(cfg, triton_path_only):
    """#15's budget: the fused encoder layer is 7 GEMMs, attention, and 4 fused kernels (the CPU profile counts the
    ops the layer dispatches; views launch nothing); unfused it is ~86."""
    from gemma4lab.lab.profiling import profile_forward
    from gemma4lab.model.vision import VisionEncoderLayer, axial_cos_sin, axial_inv_freq

    layer, nxt = VisionEncoderLayer(cfg.vision), VisionEncoderLayer(cfg.vision).input_layernorm
    x = torch.randn(1, 16, cfg.vision.hidden_size)
    pos = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(1, 16, 2)
    cos, sin = axial_cos_sin(axial_inv_freq(cfg.vision.head_dim, cfg.vision.rope_theta), pos, x.dtype)
    mask, x_in = torch.ones(1, 1, 1, 16, dtype=torch.bool), nxt(x)
    views = {"aten::view", "aten::view_as", "aten::reshape", "aten::_unsafe_view", "aten::transpose", "aten::t"}

    def launches(fusion):
        prof = profile_forward(lambda: layer(x, cos, sin, mask, fusion, x_in, nxt), warmup=1)
        return sum(n for op, n in prof["top_kernels"] if op not in views)

    fused, unfused = launches(Fusion.all()), launches(Fusion())
    print(f"encoder layer: {fused} ops fused, {unfused} unfused")
    assert fused <= 15 < 40 < unfused


@torch.no_grad()
def test_image_features_match_get_image_features(hf_model, ours, batch):
    ref = hf_model.model.get_image_features(batch["pixel_values"], batch["image_position_ids"]).pooler_output
    out = image_features(*ours, batch["pixel_values"], batch["image_position_ids"])
    assert [t.shape[0] for t in out] == [t.shape[0] for t in ref] == batch["num_soft_tokens"]
    for o, r in zip(out, ref):
        assert o.shape[-1] == 96
        assert rel_err(o, r) <= FP32_RTOL


@torch.no_grad()
def test_image_alone_equals_image_in_batch(ours, batch):
    """Padding and the other images must not leak into an image's soft tokens."""
    tower = ours[0]
    everything = tower(batch["pixel_values"], batch["image_position_ids"])
    offsets = np.cumsum([0, *batch["num_soft_tokens"]])
    for i in range(len(batch["num_soft_tokens"])):
        alone = tower(batch["pixel_values"][i : i + 1], batch["image_position_ids"][i : i + 1])
        assert rel_err(alone, everything[offsets[i] : offsets[i + 1]]) <= FP32_RTOL


@torch.no_grad()
def test_bf16_close_to_fp32_reference(cfg, hf_model, ours, batch):
    ref = hf_model.model.vision_tower(batch["pixel_values"], batch["image_position_ids"]).last_hidden_state
    tower = VisionTower(cfg.vision)
    tower.load_state_dict(ours[0].state_dict())
    tower = tower.to(torch.bfloat16)
    out = tower(batch["pixel_values"], batch["image_position_ids"])
    assert out.dtype == torch.bfloat16
    err = rel_err(out, ref)

    hf_bf16 = transformers.models.gemma4.modeling_gemma4.Gemma4VisionModel(hf_model.model.vision_tower.config)
    hf_bf16.load_state_dict(hf_model.model.vision_tower.state_dict())
    hf_bf16 = hf_bf16.to(torch.bfloat16)
    # ``from_pretrained(dtype=bfloat16)`` keeps the RoPE frequencies in fp32; ``.to()`` would have rounded them.
    hf_bf16.encoder.rotary_emb.inv_freq = hf_model.model.vision_tower.encoder.rotary_emb.inv_freq.clone()
    ref_bf16 = hf_bf16(batch["pixel_values"], batch["image_position_ids"]).last_hidden_state
    assert err <= BF16_RTOL
    assert err <= 1.5 * rel_err(ref_bf16, ref) + 1e-3, "our bf16 path is further from fp32 than the reference's"


@torch.no_grad()
def test_meta_build_then_load_is_the_same_function(cfg, ours, batch):
    """The checkpoint loader builds on ``meta`` and allocates with ``to_empty``: nothing may depend on __init__."""
    with torch.device("meta"):
        tower = VisionTower(cfg.vision)
    tower = tower.to_empty(device="cpu")
    tower.load_state_dict(ours[0].state_dict())
    args = batch["pixel_values"], batch["image_position_ids"]
    assert torch.equal(tower(*args), ours[0](*args))


def test_forward_rejects_mismatched_shapes(ours, batch):
    tower = ours[0]
    with pytest.raises(ValueError, match="must share"):
        tower(batch["pixel_values"][:2], batch["image_position_ids"][:3])
    with pytest.raises(ValueError, match="multiple of 9"):
        tower(batch["pixel_values"][:, :100], batch["image_position_ids"][:, :100])


# ---- end to end -------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_reference_model_accepts_processor_output(cfg, hf_model):
    """The full reference model checks that placeholders and vision soft tokens agree in number."""
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (64, 200, 3), dtype=np.uint8), rng.integers(0, 256, (90, 90), dtype=np.uint8)]
    img = cfg.image_token_id
    inputs = Gemma4Processor(cfg, MAX_SOFT_TOKENS)([2, 10, img, 11, 12, img, 13], images)
    assert set(inputs) == {"input_ids", "mm_token_type_ids", "pixel_values", "image_position_ids"}
    logits = hf_model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], cfg.text.vocab_size)
    assert torch.isfinite(logits).all()


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_padding_bias_is_what_sdpa_builds_from_the_boolean_mask(cfg, dtype):
    """The encoder passes SDPA an additive bias built once per forward: the same tensor SDPA makes of the boolean
    mask (0 / -inf in the activations' dtype), so the attention is bit-identical; its rows are 16-aligned in memory
    (what the memory-efficient CUDA kernel would otherwise copy into in every layer)."""
    from gemma4lab.model.vision import (
        EncoderMask,
        VisionAttention,
        axial_cos_sin,
        axial_inv_freq,
        key_padding_bias,
    )

    padding = torch.zeros(2, 20, dtype=torch.bool)
    padding[0, 13:] = True
    padding[1, 19:] = True
    bias = key_padding_bias(padding, dtype)
    assert bias.shape == (2, 1, 1, 20) and bias.dtype == dtype and bias.stride(-2) % 16 == 0
    expected = torch.where(~padding, 0.0, float("-inf")).to(dtype)[:, None, None, :]
    assert torch.equal(bias, expected)
    torch.manual_seed(0)
    attn = VisionAttention(cfg.vision).to(dtype)
    x = torch.randn(2, 20, cfg.vision.hidden_size, dtype=dtype)
    pos = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij"), -1).reshape(1, 20, 2)
    cos, sin = axial_cos_sin(axial_inv_freq(cfg.vision.head_dim, cfg.vision.rope_theta), pos.expand(2, -1, -1), dtype)
    assert torch.equal(attn(x, cos, sin, bias), attn(x, cos, sin, ~padding[:, None, None, :]))
    assert torch.equal(attn(x, cos, sin, EncoderMask(bias=bias)), attn(x, cos, sin, bias))  # what the encoder passes


# ---- the encoder's attention layout: SDPA + bias, or flash varlen ---------------------------------------------------


def test_varlen_layout_by_hand():
    """3 images of P = 7 patches with 5, 7 (no padding) and 1 real: each image's real rows, then its padding rows, as
    sequences of their own; an image without padding has an empty second sequence. Suffix padding (the processor's)
    sorts to the identity."""
    from gemma4lab.model.vision import varlen_layout

    padding = torch.ones(3, 7, dtype=torch.bool)
    for i, real in enumerate((5, 7, 1)):
        padding[i, :real] = False
    m = varlen_layout(padding)
    assert m.varlen and m.bias is None and m.max_len == 7
    assert m.cu_seqlens.dtype == torch.int32
    assert m.cu_seqlens.tolist() == [0, 5, 7, 14, 14, 15, 21]
    identity = torch.arange(7).expand(3, 7)
    assert torch.equal(m.order[..., 0], identity) and torch.equal(m.slot[..., 0], identity)


def test_varlen_layout_sorts_padding_anywhere_to_the_end():
    """Padding in the middle of an image (which the processor never makes, but the tower accepts): the sort puts its
    real rows first, both groups in their own order, and ``unsort`` is its inverse."""
    from gemma4lab.model.vision import varlen_layout

    padding = torch.tensor([[False, True, False, True, False], [True, True, False, False, True]])
    m = varlen_layout(padding)
    assert m.cu_seqlens.tolist() == [0, 3, 5, 7, 10]
    assert m.order[..., 0].tolist() == [[0, 2, 4, 1, 3], [2, 3, 0, 1, 4]]
    x = torch.randn(2, 5, 3)
    s = m.sort(x)
    assert torch.equal(s[0], x[0, [0, 2, 4, 1, 3]]) and torch.equal(m.unsort(s), x)
    assert m.sort(padding[..., None])[..., 0].tolist() == [[False] * 3 + [True] * 2, [False] * 2 + [True] * 3]


@pytest.mark.parametrize(("device", "dtype", "head_dim", "available", "varlen"), [
    ("cuda", torch.bfloat16, 72, True, True),
    ("cuda", torch.float16, 72, True, True),
    ("cuda", torch.float32, 72, True, False),  # fp32: flash has no fp32, and the parity tests run this path
    ("cuda", torch.float64, 72, True, False),
    ("cuda", torch.bfloat16, 72, False, False),  # a torch without varlen_attn (or without its scale argument)
    ("cuda", torch.bfloat16, 20, True, False),  # a head dim flash does not take (not a multiple of 8)
    ("cpu", torch.bfloat16, 72, True, False),
    ("cpu", torch.float32, 72, True, False),
])
def test_the_path_rule(device, dtype, head_dim, available, varlen):
    """One rule picks the path, a pure function of (device type, dtype, head dim, availability, images);
    ``encoder_mask`` builds what it picks, told the device type and availability, so the CUDA decision is checked
    here on CPU. One image always takes the bias (no faster with varlen on the H200, and fewer launches)."""
    from gemma4lab.model.vision import encoder_mask, key_padding_bias, use_varlen

    assert use_varlen(device, dtype, head_dim, available) is varlen
    assert use_varlen(device, dtype, head_dim, available, images=1) is False
    one = torch.zeros(1, 9, dtype=torch.bool)
    assert not encoder_mask(one, dtype, head_dim, device_type=device, available=available).varlen
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[0, 6:] = True
    m = encoder_mask(padding, dtype, head_dim, device_type=device, available=available)
    assert m.varlen is varlen
    if varlen:
        assert m.bias is None and m.cu_seqlens.tolist() == [0, 6, 9, 18, 18] and m.max_len == 9
    else:
        assert m.cu_seqlens is None and torch.equal(m.bias, key_padding_bias(padding, dtype))


def test_cpu_takes_the_bias_path(cfg):
    """Without CUDA nothing is asked of varlen: the encoder's mask on CPU is the bias, in fp32 and bf16 alike."""
    from gemma4lab.model.vision import encoder_mask, key_padding_bias, varlen_available

    assert not varlen_available(torch.device("cpu"))
    padding = torch.zeros(1, 9, dtype=torch.bool)
    padding[0, 4:] = True
    for dtype in (torch.float32, torch.bfloat16):
        m = encoder_mask(padding, dtype, cfg.vision.head_dim)
        assert not m.varlen and torch.equal(m.bias, key_padding_bias(padding, dtype))


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale):
    """Flash varlen attention's contract, sequence by sequence on the CPU: what the encoder's varlen plumbing (the
    layout, the sort, the flattened rows) is checked with where no GPU is. Every row must be covered."""
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and max_q == max_k
    bounds = cu_q.tolist()
    assert bounds[0] == 0 and bounds[-1] == q.shape[0] and q.dim() == 3
    out = torch.full_like(q, float("nan"))
    for a, b in zip(bounds[:-1], bounds[1:]):
        assert 0 <= b - a <= max_q
        if b > a:
            t = lambda x: x[a:b].transpose(0, 1)  # noqa: E731
            out[a:b] = F.scaled_dot_product_attention(t(q), t(k), t(v), scale=scale).transpose(0, 1)
    assert not out.isnan().any()
    return out


@torch.no_grad()
def test_varlen_plumbing_matches_the_bias_path_for_any_padding_placement(ours, batch, monkeypatch):
    """The encoder forced onto the varlen path (a CPU stand-in for the flash kernel) gives the bias path's soft
    tokens to fp32 rounding, with the patches of every image shuffled so that padding sits anywhere in its row block
    (the sort makes each image's real patches one sequence), and with the processor's suffix padding."""
    from gemma4lab.model import vision

    tower = ours[0]
    pv, ip = batch["pixel_values"], batch["image_position_ids"]
    g = torch.Generator().manual_seed(0)
    perm = torch.stack([torch.randperm(pv.shape[1], generator=g) for _ in range(pv.shape[0])])[..., None]
    pv_s, ip_s = pv.gather(1, perm.expand_as(pv)), ip.gather(1, perm.expand_as(ip))
    padding = (ip_s == -1).all(dim=-1)
    assert (padding[:, :-1] & ~padding[:, 1:]).any(), "the shuffle should put padding before real patches"
    bias_suffix, bias_shuffled = tower(pv, ip), tower(pv_s, ip_s)
    monkeypatch.setattr(vision, "use_varlen", lambda *args, **kwargs: True)
    monkeypatch.setattr(vision, "varlen_attention", lambda: _reference_varlen)
    assert vision.encoder_mask(padding, torch.float32, tower.cfg.head_dim).varlen
    assert rel_err(tower(pv_s, ip_s), bias_shuffled) <= FP32_RTOL
    assert rel_err(tower(pv, ip), bias_suffix) <= FP32_RTOL


# ---- on the GPU: flash varlen attention against a float64 truth --------------------------------------------------


def _real_rows_err(out: torch.Tensor, truth: torch.Tensor, real: torch.Tensor) -> float:
    return ((out[real].double() - truth[real]).norm() / truth[real].norm()).item()


def _varlen_or_skip() -> None:
    from gemma4lab.model.vision import varlen_available

    if not varlen_available(torch.device("cuda")):
        pytest.skip("this torch has no flash varlen_attn with a scale argument (torch >= 2.10), or the GPU is pre-sm80")


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_varlen_attention_against_float64_truth():
    """The 26B-A4B tower's attention shape (16 heads, head dim 72, scale 1.0) on 2 images of 40 and 29 real patches
    of P = 48, bf16: flash varlen's error on the real rows against the same module in float64 (SDPA + mask) is bf16
    rounding — within 2× of the bf16 SDPA + bias path's own error against that truth, plus a small floor — and
    every row, padding included, is finite."""
    from gemma4lab.model.vision import (
        VisionAttention,
        axial_cos_sin,
        axial_inv_freq,
        encoder_mask,
        key_padding_bias,
        varlen_layout,
    )

    _varlen_or_skip()
    vc = Gemma4Config.preset("26b-a4b").vision
    assert (vc.num_attention_heads, vc.head_dim) == (16, 72)
    torch.manual_seed(0)
    attn = VisionAttention(vc)
    with torch.no_grad():
        for norm in (attn.q_norm, attn.k_norm):
            norm.weight.copy_(torch.rand(norm.weight.shape) * 0.4 + 0.2)
    attn = attn.cuda().bfloat16()
    truth_attn = copy.deepcopy(attn).double()  # the same (bf16-rounded) weights
    p, reals = 48, (40, 29)
    padding = torch.ones(2, p, dtype=torch.bool, device="cuda")
    pos = torch.full((2, p, 2), -1, dtype=torch.long, device="cuda")
    for i, r in enumerate(reals):
        padding[i, :r] = False
        j = torch.arange(r, device="cuda")
        pos[i, :r] = torch.stack([j % 8, j // 8], dim=-1)
    x = torch.randn(2, p, vc.hidden_size, device="cuda").bfloat16()
    inv_freq = axial_inv_freq(vc.head_dim, vc.rope_theta).cuda()
    cos, sin = axial_cos_sin(inv_freq, pos, torch.bfloat16)
    cos64, sin64 = axial_cos_sin(inv_freq, pos, torch.float64)
    truth = truth_attn(x.double(), cos64, sin64, key_padding_bias(padding, torch.float64))
    sdpa = attn(x, cos, sin, key_padding_bias(padding, torch.bfloat16))
    mask = encoder_mask(padding, torch.bfloat16, vc.head_dim)
    assert mask.varlen and torch.equal(mask.cu_seqlens, varlen_layout(padding).cu_seqlens)
    assert mask.cu_seqlens.tolist() == [0, 40, 48, 48 + 29, 96]
    varlen = attn(x, cos, sin, mask)
    # the op called directly is what torch's public varlen_attn runs, bit for bit
    from torch.nn.attention.varlen import varlen_attn

    from gemma4lab.model.vision import varlen_attention

    q = torch.randn(2 * p, vc.num_attention_heads, vc.head_dim, device="cuda", dtype=torch.bfloat16)
    args = (q, q.roll(1, 0), q.roll(2, 0), mask.cu_seqlens, mask.cu_seqlens, p, p)
    assert torch.equal(varlen_attention()(*args, scale=1.0), varlen_attn(*args, scale=1.0))
    real = ~padding
    err_varlen, err_sdpa = _real_rows_err(varlen, truth, real), _real_rows_err(sdpa, truth, real)
    print(f"vs float64: flash varlen {err_varlen:.2e}, SDPA + bias (bf16) {err_sdpa:.2e}")
    assert torch.isfinite(varlen).all()
    assert err_sdpa <= BF16_RTOL  # the yardstick is itself bf16-sized
    assert err_varlen <= 2 * err_sdpa + 2e-3


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_tower_varlen_matches_the_bias_path(monkeypatch):
    """The whole tower (the 26B-A4B tower's widths, 2 layers) in bf16 on CUDA takes the varlen path by itself; its
    soft tokens are as close to the float64 tower's as the bias path's are (within 2× plus a floor) — with the
    processor's suffix padding and with every image's patches shuffled (padding anywhere)."""
    import dataclasses

    from gemma4lab.model import vision

    _varlen_or_skip()
    vc = dataclasses.replace(Gemma4Config.preset("26b-a4b").vision, num_hidden_layers=2)
    tower = random_vision_tower(vc, "cuda", torch.bfloat16)
    truth_tower = copy.deepcopy(tower).double()
    cfg = dataclasses.replace(Gemma4Config.preset("26b-a4b"), vision=vc)
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((96, 144), (150, 90))]
    pre = Gemma4Processor(cfg, MAX_SOFT_TOKENS).preprocess_images(images)
    pv, ip = pre["pixel_values"].cuda(), pre["image_position_ids"].cuda()
    perm = torch.stack([torch.randperm(pv.shape[1], generator=torch.Generator().manual_seed(i))
                        for i in range(pv.shape[0])]).cuda()[..., None]
    shuffled = pv.gather(1, perm.expand_as(pv)), ip.gather(1, perm.expand_as(ip))
    for name, (x, pos) in (("suffix padding", (pv, ip)), ("shuffled", shuffled)):
        padding = (pos == -1).all(dim=-1)
        assert vision.encoder_mask(padding, torch.bfloat16, vc.head_dim).varlen
        truth = truth_tower(x, pos).double()
        varlen = tower(x, pos)
        with monkeypatch.context() as m:
            m.setattr(vision, "use_varlen", lambda *args, **kwargs: False)
            sdpa = tower(x, pos)
        err_varlen, err_sdpa = rel_err(varlen, truth), rel_err(sdpa, truth)
        print(f"{name}: soft tokens vs float64: flash varlen {err_varlen:.2e}, SDPA + bias (bf16) {err_sdpa:.2e}")
        assert varlen.shape == sdpa.shape == truth.shape and torch.isfinite(varlen).all()
        assert err_sdpa <= BF16_RTOL
        assert err_varlen <= 2 * err_sdpa + 2e-3
