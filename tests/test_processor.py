"""The processor against transformers' PIL image processor and its prompt expansion."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from gemma4lab.model.config import Gemma4Config
from gemma4lab.model.processor import Gemma4Processor, aspect_preserving_size

transformers = pytest.importorskip("transformers")
from transformers.models.gemma4.image_processing_pil_gemma4 import (  # noqa: E402
    Gemma4ImageProcessorPil,
    get_aspect_ratio_preserving_size,
)
from transformers.processing_utils import ProcessorMixin  # noqa: E402

CFG = Gemma4Config.preset("tiny")
BIG = Gemma4Config.preset("26b-a4b")  # a full-size position table, for budgets whose long sides pass tiny's 256
IMG, BOI, EOI = CFG.image_token_id, CFG.boi_token_id, CFG.eoi_token_id
RNG = np.random.default_rng(0)


def rgb_array(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def rgb(h: int, w: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(rgb_array(h, w))


def assert_same(ours: dict, ref, atol: float = 1e-6) -> None:
    assert ours["pixel_values"].dtype == torch.float32 and ours["image_position_ids"].dtype == torch.int64
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"].float(), atol=atol, rtol=0)
    assert torch.equal(ours["image_position_ids"], ref["image_position_ids"])
    assert ours["num_soft_tokens"] == ref["num_soft_tokens_per_image"].tolist()


# ---- images against the reference -------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision picks another backend")
def test_reference_without_torchvision_is_the_pil_processor():
    assert transformers.Gemma4ImageProcessor is Gemma4ImageProcessorPil


@pytest.mark.parametrize("max_soft_tokens", [70, 280])
def test_images_match_reference(max_soft_tokens):
    base = rgb(200, 200)
    images = [
        rgb(96, 144), rgb(150, 90), base, rgb(1, 1), rgb(7, 1500), rgb(1500, 7), rgb(427, 640),
        base.convert("L"), base.convert("RGBA"), base.convert("P"), base.convert("CMYK"), base.convert("LA"),
    ]
    ours = Gemma4Processor(BIG, max_soft_tokens).preprocess_images(images)
    ref = Gemma4ImageProcessorPil(max_soft_tokens=max_soft_tokens)(images, return_tensors="pt")
    assert_same(ours, ref)
    assert ours["pixel_values"].shape == (len(images), max_soft_tokens * 9, 768)


def test_resize_arithmetic_matches_reference():
    for h, w in [(1, 1), (1, 5000), (5000, 1), (48, 48), (97, 1013), (1080, 1920), (3, 200), (333, 334)]:
        for budget in (70, 140, 280, 560, 1120):
            assert aspect_preserving_size(h, w, 16, budget * 9, 3) == get_aspect_ratio_preserving_size(
                height=h, width=w, patch_size=16, max_patches=budget * 9, pooling_kernel_size=3
            )


def test_position_ids_and_patch_layout():
    """(x=col, y=row) in row-major order; each patch flattened (row, col, channel); padding zeros at (-1, -1)."""
    image = rgb_array(288, 480)  # already the target size for 70 tokens: 18x30 patches, 6x10 soft tokens
    out = Gemma4Processor(CFG, 70).preprocess_images(image)
    pos, pix = out["image_position_ids"][0], out["pixel_values"][0]
    assert out["num_soft_tokens"] == [60]
    assert pos[:31].tolist() == [[x, 0] for x in range(30)] + [[0, 1]]
    assert pos[539].tolist() == [29, 17]
    assert (pos[540:] == -1).all() and (pix[540:] == 0).all()
    patch_1_2 = image[16:32, 32:48].astype(np.float64) / 255  # row 1, column 2
    np.testing.assert_allclose(pix[1 * 30 + 2].numpy(), patch_1_2.reshape(-1), atol=1e-7)


def test_small_images_are_scaled_up_to_the_budget():
    out = Gemma4Processor(CFG, 70).preprocess_images([rgb(1, 1), rgb(96, 144)])
    assert out["num_soft_tokens"] == [64, 60]  # 1x1 -> 384x384 px; 96x144 -> 288x480 px


def test_array_and_tensor_inputs_equal_pil():
    proc = Gemma4Processor(CFG, 70)
    a = rgb_array(150, 90)
    expected = proc.preprocess_images(PIL.Image.fromarray(a))["pixel_values"]
    grey = a[..., 0].copy()
    expected_grey = proc.preprocess_images(PIL.Image.fromarray(grey))["pixel_values"]
    rgba = np.concatenate([a, rgb_array(150, 90)[..., :1]], axis=-1)
    same = {
        "HWC uint8": a,
        "CHW uint8": a.transpose(2, 0, 1).copy(),
        "HWC float32": a.astype(np.float32) / 255,
        "HWC float64": a / 255.0,
        "tensor CHW uint8": torch.from_numpy(a).permute(2, 0, 1),
        "tensor HWC uint8": torch.from_numpy(a),
        "tensor CHW float": torch.from_numpy(a).permute(2, 0, 1).float() / 255,
        "RGBA array": rgba,
    }
    for name, image in same.items():
        assert torch.equal(proc.preprocess_images(image)["pixel_values"], expected), name
    for name, image in {"HW": grey, "HW1": grey[..., None], "1HW tensor": torch.from_numpy(grey)[None]}.items():
        assert torch.equal(proc.preprocess_images(image)["pixel_values"], expected_grey), name


def test_float_input_matches_reference_without_its_rescale():
    """Floats are [0, 1]: the reference's own rescale must be off for them (it would divide by 255 again)."""
    image = RNG.random((120, 77, 3)).astype(np.float32)
    ours = Gemma4Processor(CFG, 70).preprocess_images([image])
    ref = Gemma4ImageProcessorPil(max_soft_tokens=70)([image], do_rescale=False, return_tensors="pt")
    assert_same(ours, ref)


def test_default_budget():
    assert Gemma4Processor(Gemma4Config.preset("26b-a4b")).max_soft_tokens == 280
    assert Gemma4Processor(CFG).max_soft_tokens == 70  # the tiny preset asks for the smallest supported budget


@pytest.mark.parametrize(
    ("image", "error", "match"),
    [
        (np.zeros((32, 32, 2), np.uint8), ValueError, "channel axis of size 1, 3 or 4"),
        (np.zeros((32, 32, 5), np.uint8), ValueError, "channel axis of size 1, 3 or 4"),
        (np.zeros((32, 32, 3), np.int64), TypeError, "uint8 .* or floating point"),
        (np.zeros((32, 32, 3), bool), TypeError, "uint8 .* or floating point"),
        (np.zeros((2, 32, 32, 3), np.uint8), ValueError, "pass several images as a list"),
        (np.zeros(32, np.uint8), ValueError, r"\[H, W\], \[H, W, C\] or \[C, H, W\]"),
        (np.full((32, 32, 3), 2.0, np.float32), ValueError, r"float images must hold values in \[0, 1\]"),
        (np.full((32, 32, 3), np.nan, np.float32), ValueError, r"float images must hold values in \[0, 1\]"),
        (np.zeros((0, 32, 3), np.uint8), ValueError, "image is empty"),
        (PIL.Image.new("RGB", (0, 10)), ValueError, "image is empty"),
        ("cat.png", TypeError, "unsupported image type str"),
    ],
)
def test_bad_images_raise(image, error, match):
    with pytest.raises(error, match=match):
        Gemma4Processor(CFG, 70).preprocess_images([image])


def test_bad_processor_settings_raise():
    with pytest.raises(ValueError, match=r"max_soft_tokens must be one of \(70, 140, 280, 560, 1120\), got 16"):
        Gemma4Processor(CFG, 16)
    with pytest.raises(ValueError, match="no images given"):
        Gemma4Processor(CFG, 70).preprocess_images([])
    with pytest.raises(ValueError, match="no vision tower"):
        Gemma4Processor(Gemma4Config(text=CFG.text, vision=None), 70).preprocess_images(rgb(32, 32))
    # tiny's position table has 256 rows; a 1x200 strip at 1120 tokens is 3 x 3360 patches.
    with pytest.raises(ValueError, match="more than the position table's 256 per side"):
        Gemma4Processor(CFG, 1120).preprocess_images(rgb(1, 200))


# ---- prompts ----------------------------------------------------------------------------------------------------


def test_expand_prompt():
    proc = Gemma4Processor(CFG, 70)
    ids, types = proc.expand_prompt([2, 10, IMG, 11, IMG, 12], [3, 2])
    assert ids.tolist() == [2, 10, BOI, IMG, IMG, IMG, EOI, 11, BOI, IMG, IMG, EOI, 12]
    assert types.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0]
    assert ids.dtype == types.dtype == torch.long
    same, _ = proc.expand_prompt(torch.tensor([2, 10, IMG, 11, IMG, 12]), [3, 2])
    assert torch.equal(same, ids)
    text_only, text_types = proc.expand_prompt([2, 7, 8], [])
    assert text_only.tolist() == [2, 7, 8] and text_types.tolist() == [0, 0, 0]


def test_expand_prompt_matches_reference_replacement_and_type_ids():
    """The reference expands *text*, one ``<|image|>`` at a time, with ``f"{boi}{image * n}{eoi}"``
    (``processing_gemma4.Gemma4Processor.replace_image_token``, which cannot be imported without torchvision), then
    types tokens with ``ProcessorMixin.create_mm_token_type_ids``. One character per token here."""
    names = {"I": IMG, "B": BOI, "E": EOI, "V": CFG.video_token_id, "A": CFG.audio_token_id, "t": 7}
    text, counts = "tIttIVA", [4, 1]
    replacements = iter(f"B{'I' * n}E" for n in counts)
    ref_ids = [names[ch] for ch in "".join(next(replacements) if ch == "I" else ch for ch in text)]
    ids, types = Gemma4Processor(CFG, 70).expand_prompt([names[ch] for ch in text], counts)
    assert ids.tolist() == ref_ids
    token_ids = SimpleNamespace(image_token_ids=[IMG], video_token_ids=[CFG.video_token_id],
                                audio_token_ids=[CFG.audio_token_id])
    ref_types = ProcessorMixin.create_mm_token_type_ids(token_ids, [ref_ids])[0]
    assert types.tolist() == ref_types
    assert ref_types[-2:] == [2, 3] and ref_types[1] == ref_types[6] == 0  # video, audio; boi and eoi are text


def test_expand_prompt_errors():
    proc = Gemma4Processor(CFG, 70)
    with pytest.raises(ValueError, match=r"2 image placeholder\(s\) \(token id 500\) but 1 image\(s\)"):
        proc.expand_prompt([IMG, 5, IMG], [4])
    with pytest.raises(ValueError, match=r"1 image placeholder\(s\) \(token id 500\) but 2 image\(s\)"):
        proc.expand_prompt([IMG, 5], [4, 4])
    with pytest.raises(ValueError, match="1-D integer tensor"):
        proc.expand_prompt(torch.tensor([[IMG, 5]]), [4])
    with pytest.raises(ValueError, match="at least one soft token"):
        proc.expand_prompt([IMG], [0])


# ---- __call__ ---------------------------------------------------------------------------------------------------


def test_call_single_prompt():
    proc = Gemma4Processor(CFG, 70)
    images = [rgb(96, 144), rgb(200, 200)]
    prompt = [2, IMG, 9, IMG]
    out = proc(prompt, images)
    pre = proc.preprocess_images(images)
    n = pre["num_soft_tokens"]
    assert out["input_ids"].shape == out["mm_token_type_ids"].shape == (1, len(prompt) - 2 + sum(n) + 2 * 2)
    assert int((out["mm_token_type_ids"] == 1).sum()) == sum(n) == int((out["input_ids"] == IMG).sum())
    assert torch.equal(out["pixel_values"], pre["pixel_values"])
    assert torch.equal(out["image_position_ids"], pre["image_position_ids"])
    text = proc(torch.tensor([2, 3, 4]))
    assert set(text) == {"input_ids", "mm_token_type_ids"} and text["input_ids"].tolist() == [[2, 3, 4]]
    assert proc([2, IMG], rgb(96, 144))["input_ids"].shape == (1, 1 + 60 + 2)  # one image needs no list


def test_call_batch_of_equal_length_prompts():
    proc = Gemma4Processor(CFG, 70)
    a, b = rgb(96, 144), rgb(144, 96)  # 60 soft tokens each
    out = proc([[2, IMG, 3], [2, 4, IMG]], [[a], [b]])
    assert out["input_ids"].shape == (2, 2 + 60 + 2)
    assert out["pixel_values"].shape[0] == 2
    single, _ = proc.expand_prompt([2, 4, IMG], [60])
    assert torch.equal(out["input_ids"][1], single)
    same = proc(torch.tensor([[2, IMG, 3], [2, 4, IMG]]), [[a], [b]])
    assert torch.equal(same["input_ids"], out["input_ids"])


def test_call_errors():
    proc = Gemma4Processor(CFG, 70)
    with pytest.raises(ValueError, match=r"1 image placeholder\(s\) \(token id 500\) but 0 image\(s\)"):
        proc([2, IMG])
    with pytest.raises(ValueError, match=r"0 image placeholder\(s\) \(token id 500\) but 1 image\(s\)"):
        proc([2, 3], [rgb(96, 144)])
    with pytest.raises(ValueError, match=r"expand to different lengths \[64, 68\]"):
        proc([[2, IMG, 3], [2, 4, IMG]], [[rgb(96, 144)], [rgb(200, 200)]])
    with pytest.raises(ValueError, match="images must be a list of 2 lists"):
        proc([[2, IMG], [2, IMG]], [rgb(96, 144)])
    with pytest.raises(ValueError, match="input_ids is empty"):
        proc([])
