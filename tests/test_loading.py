"""Checkpoint loading, saving, sharding, dtype/device and random initialisation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import rel_err

import gemma4lab
from gemma4lab import Gemma4Config


def test_config_reads_both_hf_forms(hf_tiny, tiny_config):
    cfg = Gemma4Config.from_pretrained(hf_tiny[1])
    assert cfg.text == tiny_config.text
    d = json.loads((hf_tiny[1] / "config.json").read_text())
    t = d["text_config"]
    t.pop("per_layer_config")  # 5.5-style: top-level global fields
    t["global_head_dim"] = tiny_config.text.global_head_dim
    t["num_global_key_value_heads"] = tiny_config.text.num_global_key_value_heads
    assert Gemma4Config.from_hf_dict(d).text == tiny_config.text


def test_presets():
    big = Gemma4Config.preset("26b-a4b").text
    assert (big.hidden_size, big.num_hidden_layers, big.num_experts, big.top_k_experts) == (2816, 30, 128, 8)
    assert [i for i in range(30) if not big.is_sliding(i)] == [5, 11, 17, 23, 29]
    assert big.layer_head_dim(5) == 512 and big.layer_kv_heads(5) == 2 and big.layer_k_eq_v(5)
    assert big.layer_head_dim(0) == 256 and big.layer_kv_heads(0) == 8 and not big.layer_k_eq_v(0)
    with pytest.raises(ValueError, match="unknown preset"):
        Gemma4Config.preset("nope")


def test_save_roundtrip_sharded_and_loadable_by_transformers(hf_tiny, tmp_path):
    import transformers

    ours = gemma4lab.load_pretrained(hf_tiny[1])
    out = gemma4lab.save_pretrained(ours, tmp_path / "sharded", max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("*.safetensors"))) > 1
    again = gemma4lab.load_pretrained(out)
    ids = torch.randint(3, 400, (1, 21))
    assert torch.equal(again(ids).logits, ours(ids).logits)
    ref2 = transformers.Gemma4ForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        assert rel_err(ours(ids).logits, ref2(input_ids=ids).logits) <= 1e-5


def test_save_refuses_to_overwrite(hf_tiny, tmp_path):
    ours = gemma4lab.load_pretrained(hf_tiny[1])
    gemma4lab.save_pretrained(ours, tmp_path / "c")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        gemma4lab.save_pretrained(ours, tmp_path / "c")
    gemma4lab.save_pretrained(ours, tmp_path / "c", overwrite=True)


def test_load_to_dtype(hf_tiny):
    m = gemma4lab.load_pretrained(hf_tiny[1], dtype="bfloat16")
    assert m.dtype == torch.bfloat16
    assert m.language_model.layers[0].layer_scalar.dtype == torch.bfloat16
    assert m.language_model.inv_freq_full.dtype == torch.float32
    with pytest.raises(TypeError, match="dtype"):
        gemma4lab.load_pretrained(hf_tiny[1], dtype="float99")


def test_random_init_has_real_shapes_without_allocating_them():
    big = Gemma4Config.preset("26b-a4b")
    with torch.device("meta"):
        m = gemma4lab.Gemma4ForConditionalGeneration(big)
    n_text = sum(p.numel() for n, p in m.named_parameters() if "language_model" in n)
    assert 25.0e9 < n_text < 25.5e9  # 25.23 B text parameters, tied head counted once
    small = gemma4lab.random_init("tiny", dtype=torch.float32, seed=1)
    assert all(torch.isfinite(p).all() for p in small.parameters())
    w = small.language_model.layers[0].input_layernorm.weight
    assert not torch.equal(w, torch.ones_like(w))
