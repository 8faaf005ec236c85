"""gemma4lab.lab.floors: the op list of a prefill, counted again here another way — attention pairs from the mask
rule, matmul FLOPs from torch's own FLOP counter on a real forward, weight bytes from a built model's parameters —
and one layer's matmuls by hand."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gemma4lab.attention import Visibility
from gemma4lab.lab import floors as F
from gemma4lab.lab.bench.common import random_prompt
from gemma4lab.model.config import Gemma4Config
from gemma4lab.model.loading import random_init
from gemma4lab.model.multimodal import Gemma4ForConditionalGeneration

T = 40  # longer than the tiny sliding window (16): sliding and full layers see different pairs


def _by(ops: list[F.Op], name: str, layer: int | None) -> F.Op:
    (op,) = [o for o in ops if o.name == name and o.layer == layer]
    return op


@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("tokens", [1, 5, 15, 16, 17, 40])
def test_visible_pairs_match_the_mask_rule(tokens, window):
    assert F.visible_pairs(tokens, window) == int(Visibility(window=window).dense(tokens).sum())


def test_attention_flops_count_the_visible_pairs_of_each_layer_type(tiny_config):
    t = tiny_config.text
    ops = F.prefill_ops(tiny_config, T, 4)
    for i in range(t.num_hidden_layers):
        pairs = int(Visibility.for_layer(t, t.is_sliding(i)).dense(T).sum())
        assert _by(ops, "attention", i).flops == 4 * t.layer_head_dim(i) * t.num_attention_heads * pairs
    assert _by(ops, "attention", 0).flops != _by(ops, "attention", 5).flops  # sliding (head 32) vs full (head 64)


def test_matmul_flops_equal_torchs_count_of_a_real_prefill(tiny_config):
    """Every mm the model runs (projections, MLP, router, the experts each token was routed to, the head)."""
    model = random_init(tiny_config, dtype=torch.float32, device="cpu")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.prefill([random_prompt(T, tiny_config.text.vocab_size, device="cpu")])
    mm = counter.get_flop_counts()["Global"][torch.ops.aten.mm]
    ops = F.prefill_ops(tiny_config, T, 4)
    assert sum(o.flops for o in ops if o.family in ("dense_gemm", "expert_gemm")) == mm


def _variants(cfg: Gemma4Config) -> dict[str, Gemma4Config]:
    return {"tiny": cfg, "no MoE": cfg.replace_text(enable_moe_block=False),
            "full layers project V": cfg.replace_text(attention_k_eq_v=False)}


@pytest.mark.parametrize("variant", ["tiny", "no MoE", "full layers project V"])
def test_weight_bytes_are_the_models_parameters(tiny_config, variant):
    cfg = _variants(tiny_config)[variant]
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(cfg).to(torch.bfloat16)
    t = cfg.text
    every = t.num_experts if t.enable_moe_block else 0
    assert sum(o.weight_bytes for o in F.prefill_ops(cfg, T, every)) == F.text_weight_bytes(model)
    if t.enable_moe_block:  # three experts hit per layer: the other five experts' bytes are not read
        per_expert = sum(p.numel() * 2 for p in model.language_model.layers[0].experts.parameters()) / t.num_experts
        skipped = t.num_hidden_layers * (t.num_experts - 3) * per_expert
        assert sum(o.weight_bytes for o in F.prefill_ops(cfg, T, 3)) == F.text_weight_bytes(model) - skipped


def test_full_size_weight_bytes_match_the_meta_model():
    cfg = Gemma4Config.preset("26b-a4b")
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(cfg).to(torch.bfloat16)
    out = F.floors(cfg, 93, 128, copy_bw=4e12, mm_rate=7e14)
    assert out["weight_bytes"] == F.text_weight_bytes(model)


def test_one_layers_matmuls_by_hand(tiny_config):
    """tiny: hidden 96, 4 query heads; sliding layers 2 KV heads × 32, full layers 1 × 64 with K as V; 8 experts of
    48, top 2; bf16 (2 bytes)."""
    ops = F.prefill_ops(tiny_config, T, 3)
    q = _by(ops, "qkv_proj", 0)  # q 4·32 + k 2·32 + v 2·32 = 256 outputs
    assert (q.flops, q.bytes, q.weight_bytes) == (2 * 40 * 96 * 256, 2 * (40 * 96 + 96 * 256 + 40 * 256), 2 * 96 * 256)
    q = _by(ops, "qkv_proj", 5)  # q 4·64 + k 1·64, no v = 320 outputs
    assert (q.flops, q.bytes) == (2 * 40 * 96 * 320, 2 * (40 * 96 + 96 * 320 + 40 * 320))
    o = _by(ops, "o_proj", 5)
    assert (o.flops, o.bytes) == (2 * 40 * 256 * 96, 2 * (40 * 256 + 256 * 96 + 40 * 96))
    # 80 routed rows; gate+up of 3 experts hit (3 · 96 · 96 weights), the 80 expert ids as int32
    g = _by(ops, "expert_gate_up", 2)
    assert (g.flops, g.bytes) == (2 * 80 * 96 * 96, 2 * (40 * 96 + 3 * 96 * 96 + 80 * 96) + 80 * 4)
    a = _by(ops, "attention", 0)  # q, k, v in, o out; K-as-V layers still read a separate (normed) v
    assert a.bytes == 2 * 40 * (4 * 32 + 2 * 32 + 2 * 32 + 4 * 32) and a.weight_bytes == 0
    assert _by(ops, "attention", 5).bytes == 2 * 40 * (4 * 64 + 64 + 64 + 4 * 64)
    head = _by(ops, "lm_head", None)  # the last token only, against the tied 512 × 96 table
    assert (head.flops, head.bytes) == (2 * 96 * 512, 2 * (96 + 96 * 512 + 512))


def test_floors_bound_by_bandwidth_or_by_math(tiny_config):
    """With an unbounded matmul rate every op is a copy: the floor is all bytes over bandwidth; with unbounded
    bandwidth it is all FLOPs over the rate (the single compute floor)."""
    ops = F.prefill_ops(tiny_config, T, 4)
    total_bytes = sum(o.bytes for o in ops)
    copy_only = F.floors(tiny_config, T, 4, copy_bw=1e9, mm_rate=1e30)
    assert copy_only["op_floor_ms"] == pytest.approx(total_bytes / 1e9 * 1e3)
    assert copy_only["op_floor_ms"] > copy_only["weight_floor_ms"] == copy_only["floor_ms"]
    math_only = F.floors(tiny_config, T, 4, copy_bw=1e30, mm_rate=1e9)
    assert math_only["op_floor_ms"] == pytest.approx(math_only["compute_floor_ms"]) == pytest.approx(
        math_only["floor_ms"])
    by = copy_only["op_floor_by_family_ms"]
    assert list(by) == list(F.FAMILIES) and sum(by.values()) == pytest.approx(copy_only["op_floor_ms"])
    assert by["expert_gemm"] == pytest.approx(sum(o.bytes for o in ops if o.family == "expert_gemm") / 1e9 * 1e3)


@pytest.mark.parametrize("tokens", [93, 1453, 11533])
def test_op_floor_is_never_below_the_single_floor(tokens):
    out = F.floors(Gemma4Config.preset("26b-a4b"), tokens, 128, copy_bw=4e12, mm_rate=7e14)
    assert out["op_floor_ms"] > out["floor_ms"]
    assert out["op_floor_by_family_ms"]["attention"] > 0 and out["op_floor_by_family_ms"]["routing"] > 0


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"tokens": 0}, ValueError, "tokens"), ({"tokens": 2.5}, TypeError, "tokens"),
    ({"tokens": True}, TypeError, "tokens"), ({"experts_hit": 1}, ValueError, "experts_hit"),
    ({"experts_hit": 9}, ValueError, "experts_hit"), ({"experts_hit": "8"}, TypeError, "experts_hit"),
    ({"tokens": 1, "experts_hit": 3}, ValueError, "experts_hit"), ({"copy_bw": 0.0}, ValueError, "copy_bw"),
    ({"mm_rate": float("nan")}, ValueError, "mm_rate"), ({"elem_bytes": 0}, ValueError, "elem_bytes"),
    ({"cfg": "tiny"}, TypeError, "Gemma4Config"),
])  # fmt: skip
def test_bad_input_is_a_clear_error(tiny_config, kwargs, error, match):
    args = {"cfg": tiny_config, "tokens": T, "experts_hit": 4, "copy_bw": 1e12, "mm_rate": 1e14, "elem_bytes": 2,
            **kwargs}
    with pytest.raises(error, match=match):
        F.floors(**args)


def test_a_model_without_moe_hits_no_experts(tiny_config):
    cfg = tiny_config.replace_text(enable_moe_block=False)
    with pytest.raises(ValueError, match="without MoE"):
        F.prefill_ops(cfg, T, 4)
    assert not [o for o in F.prefill_ops(cfg, T, 0) if o.family in ("expert_gemm", "routing")]


def test_an_unknown_family_is_refused():
    with pytest.raises(ValueError, match="family"):
        F.op_floor([F.Op("x", "magic", None, 1.0, 0.0, 0.0)], 1e12, 1e14)


# ---- decode --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("experts", "top_k", "tokens"), [(8, 2, 1), (8, 2, 3), (8, 2, 40), (128, 8, 4),
                                                          (128, 8, 16)])
def test_expected_experts_match_a_monte_carlo_count(experts, top_k, tokens):
    """Each token's top-k of i.i.d. random logits is a uniformly random k-subset: count the distinct experts of
    20000 such batches (fixed seed) and compare with the formula within four standard errors."""
    gen = torch.Generator().manual_seed(0)
    trials = 20000
    picks = torch.rand(trials, tokens, experts, generator=gen).topk(top_k, dim=-1).indices
    hit = torch.zeros(trials, experts).scatter_(1, picks.reshape(trials, -1), 1.0).sum(1)
    want = F.expected_experts(experts, top_k, tokens)
    assert abs(hit.mean().item() - want) <= 4 * hit.std().item() / trials**0.5 + 1e-9
    assert top_k <= want <= min(experts, tokens * top_k)


def test_expected_experts_edges():
    assert F.expected_experts(128, 8, 1) == 8  # one token: exactly its k experts
    assert F.expected_experts(128, 8, 10**6) == 128  # enough tokens: every expert
    assert F.expected_experts(128, 8, 16) == pytest.approx(128 * (1 - (120 / 128) ** 16))  # 82.4 for batch 16
    with pytest.raises(ValueError, match="top_k"):
        F.expected_experts(4, 8, 2)
    with pytest.raises(ValueError, match="tokens"):
        F.expected_experts(128, 8, 0)


def test_kv_bytes_by_hand(tiny_config):
    """tiny, bf16: sliding layers 0-4 store K and V of 2 heads × 32 (256 B a token) in a window of 16, so a new token
    reads at most 15 earlier ones; full layer 5 has 1 head × 64 with K as V: 128 B a token for the floor, 256 as
    cached."""
    assert F.kv_read_bytes(tiny_config, 3, 40) == 3 * (5 * 15 * 256 + 40 * 128)
    assert F.kv_read_bytes(tiny_config, 3, 40, as_cached=True) == 3 * (5 * 15 * 256 + 40 * 256)
    assert F.kv_read_bytes(tiny_config, 3, 5) == 3 * (5 * 5 * 256 + 5 * 128)  # inside the window: every token
    assert F.kv_read_bytes(tiny_config, 2, 0) == 0
    projected_v = tiny_config.replace_text(attention_k_eq_v=False)  # full layers keep 2 KV heads and store V
    assert F.kv_read_bytes(projected_v, 1, 40) == 5 * 15 * 256 + 40 * 2 * 2 * 64 * 2


@pytest.mark.parametrize("context", [3, 15, 16, 40])
def test_kv_bytes_as_cached_follow_the_caches_own_layout(tiny_config, context):
    """Counted again from the tensors ``KVCache`` allocates: per layer, bytes of one slot of K and V times the
    earlier tokens the new one sees (the mask rule's window on sliding layers)."""
    from gemma4lab.runtime.kv_cache import KVCache

    t = tiny_config.text
    cache = KVCache(t, 2, context + 1, torch.bfloat16, "meta")
    want = 0
    for i in range(t.num_hidden_layers):
        slot = sum(x[0, :, 0].numel() * x.element_size() for x in (cache.k[i], cache.v[i]))
        seen = int(Visibility(window=t.sliding_window if t.is_sliding(i) else None).dense(context + 1)[-1].sum()) - 1
        want += 2 * slot * seen
    assert F.kv_read_bytes(tiny_config, 2, context, as_cached=True) == want


def test_decode_floor_by_hand(tiny_config):
    """tiny, bf16, 3 sequences at 40 tokens with 5 experts touched: the non-expert weights counted parameter by
    parameter, 5 of 8 experts of 3 · 48 · 96 in each of the 6 layers, the KV of the test above."""
    h, inter, v = 96, 80, 512
    common = 3 * h * inter + 8 * h + h * 8 + 8  # dense MLP, 7 norms + router scale, router, per-expert scale
    sliding = h * 128 + 2 * h * 64 + 128 * h + 2 * 32 + common  # q, k, v, o, q/k norms
    full = h * 256 + h * 64 + 256 * h + 2 * 64 + common  # q, k (K as V: no v_proj), o, q/k norms
    non_expert = 2 * (5 * sliding + full + v * h + h)  # + the tied embedding table (the head) and the final norm
    out = F.decode_floor(tiny_config, 3, 40, 5.0, copy_bw=1e9)
    assert out["non_expert_bytes"] == non_expert
    assert out["expert_bytes"] == 2 * 6 * 5 * 3 * 48 * h
    assert out["kv_bytes"] == 3 * (5 * 15 * 256 + 40 * 128)
    assert out["bytes"] == non_expert + out["expert_bytes"] + out["kv_bytes"]
    assert out["floor_ms"] == pytest.approx(out["bytes"] / 1e9 * 1e3)


def test_decode_floor_counts_every_parameter_when_every_expert_is_touched(tiny_config):
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(tiny_config).to(torch.bfloat16)
    out = F.decode_floor(tiny_config, 4, 0, 8.0, copy_bw=1e12)
    assert out["non_expert_bytes"] + out["expert_bytes"] == F.text_weight_bytes(model) and out["kv_bytes"] == 0


def test_decode_floor_averages_the_kv_over_the_steps(tiny_config):
    out = F.decode_floor(tiny_config, 2, 14, 3.0, copy_bw=1e12, steps=4)
    assert out["kv_bytes"] == sum(F.kv_read_bytes(tiny_config, 2, 14 + j) for j in range(4)) / 4
    with pytest.raises(ValueError, match="steps"):
        F.decode_floor(tiny_config, 2, 14, 3.0, copy_bw=1e12, steps=0)
    with pytest.raises(ValueError, match="experts_hit"):
        F.decode_floor(tiny_config, 1, 14, 3.0, copy_bw=1e12)  # one sequence touches exactly top_k = 2
    with pytest.raises(ValueError, match="context"):
        F.kv_read_bytes(tiny_config, 1, -1)


# ---- the vision tower -------------------------------------------------------------------------------------------
def test_vision_floor_weights_are_the_towers_matmul_parameters():
    """Every weight the tower's math reads once: the built tiny model's vision and projector parameters and its
    standardisation vectors, less the position table (looked up, two rows a patch) — counted from the module tree."""
    import torch

    from gemma4lab import random_init
    from gemma4lab.lab.floors import vision_ops

    model = random_init("tiny", dtype=torch.bfloat16)
    v = model.config.vision
    params = sum(p.numel() for n, p in [*model.named_parameters(), *model.named_buffers()]
                 if ("vision_tower" in n or "embed_vision" in n) and "position_embedding_table" not in n)
    pool = v.pooling_kernel_size ** 2
    ops = vision_ops(model.config, [4 * pool, 2 * pool])
    assert sum(o.weight_bytes for o in ops) == 2 * params


def test_vision_floor_counts_attention_within_each_image():
    from gemma4lab import Gemma4Config
    from gemma4lab.lab.floors import vision_floor

    cfg = Gemma4Config.preset("26b-a4b")
    v = cfg.vision
    one, two = vision_floor(cfg, [2430], 4e12, 8e14), vision_floor(cfg, [2430, 2430], 4e12, 8e14)
    per_image = 4 * v.head_dim * v.num_attention_heads * 2430**2 * v.num_hidden_layers
    assert one["attention_flops"] == per_image and two["attention_flops"] == 2 * per_image  # not (2·2430)²
    assert two["flops"] == 2 * one["flops"] and two["weight_bytes"] == one["weight_bytes"]
    assert one["floor_ms"] == max(one["weight_floor_ms"], one["compute_floor_ms"]) <= one["op_floor_ms"]


def test_vision_floor_refuses_what_it_cannot_count():
    from gemma4lab import Gemma4Config
    from gemma4lab.lab.floors import vision_floor

    cfg = Gemma4Config.preset("26b-a4b")
    with pytest.raises(ValueError, match="multiple of the 9-patch pooling block"):
        vision_floor(cfg, [100], 4e12, 8e14)
    with pytest.raises(ValueError, match="non-empty list"):
        vision_floor(cfg, [], 4e12, 8e14)
    with pytest.raises(ValueError, match="vision tower"):
        vision_floor(Gemma4Config(text=cfg.text, vision=None), [9], 4e12, 8e14)


def test_fp8_experts_halve_the_expert_bytes_and_count_their_scales():
    """FP8 experts: one byte a weight plus one fp32 scale per expert and output channel; nothing else changes."""
    from gemma4lab import Gemma4Config
    from gemma4lab.lab.floors import prefill_ops

    cfg = Gemma4Config.preset("26b-a4b").text
    bf16, fp8 = prefill_ops(cfg, 93, 128.0), prefill_ops(cfg, 93, 128.0, expert_elem_bytes=1)
    per = lambda ops, fam: sum(o.weight_bytes for o in ops if o.family == fam)  # noqa: E731
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    scales = cfg.num_hidden_layers * e * (2 * i + h) * 4
    assert per(fp8, "expert_gemm") == per(bf16, "expert_gemm") / 2 + scales
    assert per(fp8, "dense_gemm") == per(bf16, "dense_gemm")
    assert [o.flops for o in fp8] == [o.flops for o in bf16]
