"""The vision tower and projector against transformers' ``Gemma4ForConditionalGeneration`` (eager attention).

One tiny HF model is built with random, deliberately non-trivial vision weights (norm weights away from 1, a
random standardisation) and its state dict is loaded into ours by name, which is itself the key-compatibility test.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

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
    from gemma4lab.model.vision import VisionAttention, axial_cos_sin, axial_inv_freq, key_padding_bias

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
