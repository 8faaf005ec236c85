"""Careless or hostile input: a clear ValueError/TypeError (or the reference's own behaviour), never a crash, a
segfault, a silent wrong answer, or lost data. Each test reproduces a defect that was reachable before."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import gemma4lab
from gemma4lab import Gemma4Config
from gemma4lab import kernels as K
from gemma4lab.model import loading

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(hf_tiny):
    return gemma4lab.load_pretrained(hf_tiny[1])


# ---- 1. NaN / inf router logits, NaN pixels ----------------------------------------------------------------------
def test_router_handles_nan_and_inf_as_torch_topk_does():
    nan, inf = float("nan"), float("inf")
    logits = torch.randn(7, 8)
    logits[1, 3], logits[2, 0], logits[3], logits[4, 5], logits[5] = nan, inf, -inf, -inf, nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy warns about the NaN it handles
        w, ids = K.gemma_router_topk(logits, torch.ones(8), 3)
    w_ref, ids_ref = K.gemma_router_topk_ref(logits, torch.ones(8), 3)
    assert ((ids >= 0) & (ids < 8)).all() and all(len(set(r.tolist())) == 3 for r in ids)
    assert torch.equal(w.isnan(), w_ref.isnan())  # rows with NaN/+inf logits: NaN weights, like the reference
    finite = ~w_ref.isnan().any(-1)
    assert torch.equal(ids[finite], ids_ref[finite])
    torch.testing.assert_close(w[finite], w_ref[finite].float())


@pytest.mark.parametrize("bad, err, says", [
    (lambda pv: pv * 255, ValueError, "in \\[0, 1\\]"),
    (lambda pv: (pv * 255).to(torch.uint8), TypeError, "floating point"),
    (lambda pv: pv.index_fill(1, torch.tensor([0]), float("nan")), ValueError, "finite"),
])
def test_bad_pixel_values_are_refused(model, tiny_config, bad, err, says):
    proc = gemma4lab.Gemma4Processor(tiny_config)
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    batch = proc(input_ids=[2, tiny_config.image_token_id, 5], images=[img])
    batch["pixel_values"] = bad(batch["pixel_values"])
    with pytest.raises(err, match=says):
        model(**batch)


def test_image_positions_past_the_table_are_refused(model, tiny_config):
    proc = gemma4lab.Gemma4Processor(tiny_config)
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    batch = proc(input_ids=[2, tiny_config.image_token_id, 5], images=[img])
    batch["image_position_ids"][0, 0, 0] = tiny_config.vision.position_embedding_size
    with pytest.raises(ValueError, match="position table"):
        model(**batch)
    batch["image_position_ids"][0, 0, 0] = -2  # below the padding marker
    with pytest.raises(ValueError, match=r"got values in \[-2, "):
        model(**batch)


def test_token_types_must_match_the_ids(model, tiny_config):
    proc = gemma4lab.Gemma4Processor(tiny_config)
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    batch = proc(input_ids=[2, tiny_config.image_token_id, 5], images=[img])
    batch["mm_token_type_ids"][0, 0] = 1  # the BOS marked as an image token: the masks would change silently
    with pytest.raises(ValueError, match="disagrees with input_ids"):
        model(**batch)


def test_absurd_generation_length_is_refused(model):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(torch.tensor([[2, 5, 6]]), 10**12)
    with pytest.raises(ValueError, match="positive int"):
        model.generate(torch.tensor([[2, 5, 6]]), True)


# ---- 2. checkpoints: atomic, no stale files, transformers' precedence --------------------------------------------
def _logits(m):
    return m(torch.tensor([[2, 7, 9, 11]])).logits


def test_overwrite_sharded_with_single_loads_the_new_weights(model, tmp_path):
    path = tmp_path / "ck"
    gemma4lab.save_pretrained(model, path, max_shard_bytes=200_000)
    other = gemma4lab.random_init(model.config, dtype=torch.float32, seed=9)
    gemma4lab.save_pretrained(other, path, overwrite=True)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]  # no stale shards/index
    assert torch.equal(_logits(gemma4lab.load_pretrained(path)), _logits(other))


def test_interrupted_overwrite_leaves_the_old_checkpoint(model, tmp_path, monkeypatch):
    path = tmp_path / "ck"
    gemma4lab.save_pretrained(model, path, max_shard_bytes=200_000)
    (path / "tokenizer.json").write_text('{"mine": true}')
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def crash_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash between shards")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", crash_on_second_shard)
    other = gemma4lab.random_init(model.config, dtype=torch.float32, seed=9)
    with pytest.raises(KeyboardInterrupt):
        gemma4lab.save_pretrained(other, path, overwrite=True, max_shard_bytes=200_000)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ck.")]  # no temporary left behind
    assert torch.equal(_logits(gemma4lab.load_pretrained(path)), _logits(model))


def test_overwrite_keeps_the_users_other_files(model, tmp_path):
    path = tmp_path / "ck"
    gemma4lab.save_pretrained(model, path)
    (path / "tokenizer.json").write_text("keep me")
    (path / "extras").mkdir()
    (path / "extras" / "notes.txt").write_text("and me")
    gemma4lab.save_pretrained(model, path, overwrite=True, max_shard_bytes=200_000)
    assert (path / "tokenizer.json").read_text() == "keep me" and (path / "extras" / "notes.txt").read_text() == \
        "and me"


def test_no_overwrite_refuses_even_a_lone_config(model, tmp_path):
    path = tmp_path / "ck"
    path.mkdir()
    (path / "config.json").write_text('{"someone": "else"}')
    with pytest.raises(FileExistsError, match="overwrite=True"):
        gemma4lab.save_pretrained(model, path)
    assert json.loads((path / "config.json").read_text()) == {"someone": "else"}
    (path / "config.json").unlink()
    (path / "README.md").write_text("mine")
    gemma4lab.save_pretrained(model, path)  # other files are no reason to refuse
    assert (path / "README.md").read_text() == "mine"


def test_single_file_wins_over_an_index_as_in_transformers(model, tmp_path):
    path = tmp_path / "ck"
    other = gemma4lab.random_init(model.config, dtype=torch.float32, seed=9)
    gemma4lab.save_pretrained(other, tmp_path / "sharded", max_shard_bytes=200_000)
    gemma4lab.save_pretrained(model, path)
    for f in (tmp_path / "sharded").glob("model*"):
        shutil.copy(f, path / f.name)  # a stale index and shards beside the single file
    assert torch.equal(_logits(gemma4lab.load_pretrained(path)), _logits(model))


def test_index_and_shards_that_disagree_are_an_error(model, tmp_path):
    path = tmp_path / "ck"
    gemma4lab.save_pretrained(model, path, max_shard_bytes=200_000)
    index = json.loads((path / loading.INDEX).read_text())
    key = next(iter(index["weight_map"]))
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][key] = next(s for s in shards if s != index["weight_map"][key])
    (path / loading.INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="disagree"):
        gemma4lab.load_pretrained(path)


def test_shard_paths_outside_the_checkpoint_are_refused(model, tmp_path):
    path = tmp_path / "ck"
    gemma4lab.save_pretrained(model, path, max_shard_bytes=200_000)
    index = json.loads((path / loading.INDEX).read_text())
    index["weight_map"] = {k: "../elsewhere.safetensors" for k in index["weight_map"]}
    (path / loading.INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside the checkpoint"):
        gemma4lab.load_pretrained(path)


def test_untied_head_and_non_float_weights_are_refused(model, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "ck"
    gemma4lab.save_pretrained(model, path)
    state = load_file(path / "model.safetensors")
    state["lm_head.weight"] = torch.randn_like(state["model.language_model.embed_tokens.weight"])
    save_file(state, path / "model.safetensors")
    with pytest.raises(ValueError, match="untied head"):
        gemma4lab.load_pretrained(path)
    state.pop("lm_head.weight")
    key = "model.language_model.norm.weight"
    state[key] = torch.ones_like(state[key], dtype=torch.int8)
    save_file(state, path / "model.safetensors")
    with pytest.raises(ValueError, match="non-float"):
        gemma4lab.load_pretrained(path)


def test_non_json_config_is_a_value_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Gemma4Config.from_pretrained(tmp_path)


# ---- 3. ./dev never deletes what it did not create ---------------------------------------------------------------
def test_dev_refuses_to_delete_a_foreign_venv_folder(tmp_path):
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("do not delete")
    env = {**os.environ, "GEMMA4LAB_VENV": str(foreign)}
    r = subprocess.run([str(ROOT / "dev"), "lint"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "refusing to delete" in r.stderr
    assert (foreign / "precious.txt").read_text() == "do not delete"


# ---- 5. configurations that would build a wrong model -------------------------------------------------------------
@pytest.mark.parametrize("d, says", [
    ({}, "model_type"),
    ({"model_type": "llama", "hidden_size": 4096}, "not a Gemma 4"),
    ({"model_type": "gemma4", "text_config": None}, "text_config"),
    ({"model_type": "gemma4", "text_config": {"model_type": "gemma4_text"}, "vision_config": 3}, "vision_config"),
])
def test_foreign_configs_are_refused(d, says):
    with pytest.raises(ValueError, match=says):
        Gemma4Config.from_hf_dict(d)


@pytest.mark.parametrize("field, value, says", [
    ("sliding_window", 0, "sliding_window"), ("sliding_window", -4, "sliding_window"),
    ("rms_norm_eps", -1e-6, "rms_norm_eps"), ("rms_norm_eps", float("nan"), "rms_norm_eps"),
    ("top_k_experts", 0, "top_k_experts"), ("head_dim", 33, "even"), ("num_hidden_layers", 0, "num_hidden_layers"),
    ("num_key_value_heads", 0, "num_key_value_heads"), ("hidden_size", 2.5, "hidden_size"),
    ("final_logit_softcapping", -30.0, "softcapping"),
])
def test_config_values_that_build_wrong_models_are_refused(tiny_config, field, value, says):
    d = tiny_config.to_hf_dict()
    d["text_config"][field] = value
    if field == "num_hidden_layers":
        d["text_config"]["layer_types"] = []
    with pytest.raises(ValueError, match=says):
        Gemma4Config.from_hf_dict(d)


# ---- 6. kernels never trust their index arguments ------------------------------------------------------------------
def test_attention_rejects_bad_cu_seqlens():
    q = torch.randn(10, 2, 16)
    k = v = torch.randn(10, 1, 16)
    for cu, mx in (([0, 12], 12), ([0, 6], 6), ([0, 7, 3, 10], 7), ([2, 10], 8)):
        with pytest.raises(ValueError, match="cu_seqlens"):
            K.gemma_prefill_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), mx)
    with pytest.raises(ValueError, match="max_seqlen"):
        K.gemma_prefill_attention(q, k, v, torch.tensor([0, 10], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="key_end"):
        K.gemma_prefill_attention(q, k, v, torch.tensor([0, 10], dtype=torch.int32), 10,
                                  key_end=torch.full((10,), 11, dtype=torch.int32))


def test_moe_kernels_reject_bad_indices():
    a = torch.randn(6, 8)
    w = torch.randn(3, 4, 8)
    for offs in ([2, 4, 9], [2, 1, 6], [-1, 3, 6], [2, 4, 5]):
        with pytest.raises(ValueError, match="offsets"):
            K.gemma_moe_gemm(a, w, torch.tensor(offs, dtype=torch.int32))
    ys = torch.randn(6, 8)
    with pytest.raises(ValueError, match="positions"):
        K.gemma_moe_combine(ys, torch.tensor([0, 1, 2, 6]), torch.rand(2, 2))
    with pytest.raises(ValueError, match="positions"):
        K.gemma_moe_combine(ys, torch.tensor([0, -1, 2, 3]), torch.rand(2, 2))
