"""Bad input gets a clear error that names what was expected."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import gemma4lab
from gemma4lab import Gemma4Config


@pytest.fixture(scope="module")
def model(hf_tiny):
    return gemma4lab.load_pretrained(hf_tiny[1])


def _copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def _tampered_ckpt(src, dst, edit):
    """A copy of the checkpoint whose tensors ``edit(state)`` changed in place."""
    path = _copy_ckpt(src, dst)
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors")
    return path


def test_missing_key_is_named(hf_tiny, tmp_path):
    path = _tampered_ckpt(hf_tiny[1], tmp_path / "ck", lambda s: s.pop("model.language_model.layers.0.router.scale"))
    with pytest.raises(ValueError, match=r"missing keys.*layers\.0\.router\.scale"):
        gemma4lab.load_pretrained(path)


def test_unexpected_key_is_named(hf_tiny, tmp_path):
    path = _tampered_ckpt(hf_tiny[1], tmp_path / "ck", lambda s: s.update(
        {"model.language_model.layers.0.self_attn.bogus.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected keys.*bogus"):
        gemma4lab.load_pretrained(path)


def test_wrong_shape_is_named(hf_tiny, tmp_path):
    path = _tampered_ckpt(hf_tiny[1], tmp_path / "ck", lambda s: s.update(
        {"model.language_model.norm.weight": torch.ones(5)}))
    with pytest.raises(ValueError, match=r"shape mismatches.*norm\.weight"):
        gemma4lab.load_pretrained(path)


def test_unsupported_config_field_is_named(hf_tiny, tmp_path):
    path = _copy_ckpt(hf_tiny[1], tmp_path / "ck")
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["hidden_size_per_layer_input"] = 256
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_size_per_layer_input"):
        Gemma4Config.from_pretrained(path)


def test_missing_checkpoint_dir():
    with pytest.raises(ValueError, match="does not exist"):
        gemma4lab.load_pretrained("/nonexistent/checkpoint")


def test_token_ids_out_of_range(model):
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 512\)"):
        model(torch.tensor([[1, 2, 9999]]))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[-1, 2]]))


def test_wrong_ids_type_and_shape(model):
    with pytest.raises(TypeError, match="int64 or int32"):
        model(torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"\[batch, seq_len\]"):
        model(torch.ones(1, 2, 3, dtype=torch.long))


def test_more_placeholders_than_images(model, tiny_config):
    proc = gemma4lab.Gemma4Processor(tiny_config)
    import numpy as np

    img = np.zeros((96, 96, 3), dtype=np.uint8) + 120
    ids = [2, tiny_config.image_token_id, 5, tiny_config.image_token_id, 6]
    with pytest.raises(ValueError, match="placeholder"):
        proc(input_ids=ids, images=[img])


def test_placeholders_without_pixels(model, tiny_config):
    ids = torch.tensor([[2, tiny_config.image_token_id, 5]])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(ids)
    # the PCG runner learns of the placeholders from the ids' range check (one host read for both) and says the same
    from gemma4lab.runtime.pcg import PiecewiseCudaGraphRunner

    runner = PiecewiseCudaGraphRunner(model, max_tokens=8, progress=False)
    with pytest.raises(ValueError, match="2 image placeholder tokens but no pixel_values"):
        runner.prefill([torch.tensor([2, tiny_config.image_token_id, 5, tiny_config.image_token_id])])


def test_the_ids_range_check_counts_the_image_placeholders(model, tiny_config):
    img = tiny_config.image_token_id
    _, batch = model.pack_prompts([torch.tensor([2, img, img, 5]), torch.tensor([7, img])], None)
    assert batch.image_tokens == 3
    _, batch = model.pack_prompts([torch.tensor([2, 5])], None)
    assert batch.image_tokens == 0
    with pytest.raises(ValueError, match="token ids must lie in"):
        model.pack_prompts([torch.tensor([2, tiny_config.text.vocab_size])], None)


def test_fusion_switch_rejects_unknown(model):
    with pytest.raises(ValueError, match="fusion must be"):
        model.set_fusion("fast")
    with pytest.raises(ValueError, match="next_norm"):
        gemma4lab.Fusion(next_norm=True)
