"""Images and token ids → the tensors ``Gemma4ForConditionalGeneration.forward`` takes.

Images follow ``Gemma4ImageProcessorPil``, which is what ``transformers`` resolves ``Gemma4ImageProcessor`` to when
torchvision is not installed (the torchvision backend resizes with its own antialiased bicubic and differs by
about 1e-2). Each image is

1. converted to RGB (PIL ``convert("RGB")``: alpha dropped, greyscale replicated, palette looked up),
2. resized bicubic, keeping its aspect ratio, to the largest size whose sides are multiples of ``patch·k`` = 48 px
   and that fits the budget of ``max_soft_tokens·k²`` patches (small images are scaled *up*),
3. rescaled to [0, 1] (no mean/std normalisation: the model does ``2·(p − 0.5)`` itself),
4. cut into 16×16 patches in row-major order, each flattened in (row, col, channel) order,
5. padded to ``max_soft_tokens·k²`` patches with zero pixels and position (-1, -1).

Prompts are token ids (tokenising is not this module's job): each ``image_token_id`` placeholder becomes
``[boi] + n × [image_token_id] + [eoi]`` where n is that image's number of soft tokens.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from gemma4lab.model.config import Gemma4Config, VisionConfig

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)  # the budgets the reference image processor accepts
DEFAULT_SOFT_TOKENS = 280  # the reference image processor's default

ImageInput = PIL.Image.Image | np.ndarray | Tensor


def aspect_preserving_size(height: int, width: int, patch_size: int, max_patches: int, k: int) -> tuple[int, int]:
    """The reference's target size: scale the area to ``max_patches`` patches, then floor each side to a multiple of
    ``patch_size·k``. A side that floors to zero becomes one block and the other side keeps the (floored) aspect
    ratio, capped at the longest side the budget allows."""
    target_px = max_patches * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    side = k * patch_size
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    if th == 0 and tw == 0:  # cannot happen for a budget of at least one soft token; kept as in the reference
        raise ValueError(f"image {height}x{width} resizes to 0x0")
    max_side = (max_patches // k**2) * side
    if th == 0:
        th, tw = side, min(int(math.floor(width / height)) * side, max_side)
    elif tw == 0:
        th, tw = min(int(math.floor(height / width)) * side, max_side), side
    if th * tw > target_px:
        raise ValueError(f"resizing {height}x{width} to {th}x{tw} exceeds {max_patches} patches")
    return th, tw


def _rescale(image: np.ndarray, scale: float) -> np.ndarray:
    """As ``transformers.image_transforms.rescale``: multiply in float64, then round to float32."""
    return (image.astype(np.float64) * scale).astype(np.float32)


def to_rgb_array(image: ImageInput) -> np.ndarray:
    """Any supported image → [H, W, 3], uint8 (0..255) or float (0..1).

    PIL: any mode PIL can convert to RGB. Arrays and tensors: [H, W], or 3-D with 1, 3 or 4 channels; numpy is
    read channels-last and torch channels-first when both ends could be channels. One channel is replicated and a
    fourth (alpha) dropped, which is what PIL's ``convert("RGB")`` does to L and RGBA images.
    """
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image is empty ({image.width}x{image.height} px)")
        if image.mode != "RGB":
            try:
                image = image.convert("RGB")
            except (ValueError, OSError) as e:
                raise ValueError(f"PIL image mode {image.mode!r} cannot be converted to RGB: {e}") from e
        return np.asarray(image)
    if isinstance(image, Tensor):
        channels_first = True
        t = image.detach().cpu()
        array = (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()
    elif isinstance(image, np.ndarray):
        channels_first, array = False, image
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}: expected a PIL image, numpy array or tensor")

    if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"image arrays must be uint8 (0..255) or floating point (0..1), got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim == 3:
        first_ok, last_ok = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
        if first_ok and (channels_first or not last_ok):
            array = array.transpose(1, 2, 0)
        elif not last_ok:
            raise ValueError(f"image array of shape {array.shape} has no channel axis of size 1, 3 or 4 (L, RGB, RGBA)")
    else:
        raise ValueError(
            f"image arrays must be [H, W], [H, W, C] or [C, H, W], got shape {array.shape} "
            "(pass several images as a list)"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image is empty (shape {array.shape})")
    if array.dtype != np.uint8 and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
        raise ValueError(
            f"float images must hold values in [0, 1], got [{array.min()}, {array.max()}] (pass uint8 for 0..255)"
        )
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def resize_and_rescale(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, 3] → float32 [height, width, 3] in [0, 1], bicubic through PIL as the reference does.

    PIL resizes 8-bit images only, so a float image is quantised first by ``uint8(float32(x·255))`` (truncating, as
    ``to_pil_image`` does; exact for values k/255). An image already at the target size is not resampled.
    """
    if image.shape[:2] != (height, width):
        if image.dtype != np.uint8:
            image = _rescale(image, 255).astype(np.uint8)
        image = np.asarray(PIL.Image.fromarray(image).resize((width, height), resample=PIL.Image.BICUBIC))
    return _rescale(image, 1 / 255) if image.dtype == np.uint8 else image.astype(np.float32)


def patchify(image: np.ndarray, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[H, W, C] → patches [H/p · W/p, p·p·C] in row-major patch order, each in (row, col, channel) order, and
    their positions [n, 2] as (x = column, y = row)."""
    h, w, c = image.shape
    ph, pw = h // patch_size, w // patch_size
    patches = image.reshape(ph, patch_size, pw, patch_size, c).transpose(0, 2, 1, 3, 4).reshape(ph * pw, -1)
    ys, xs = np.meshgrid(np.arange(ph), np.arange(pw), indexing="ij")
    positions = np.stack([xs, ys], axis=-1).reshape(ph * pw, 2)
    return patches, positions


class Gemma4Processor:
    """Prepares model inputs: ``preprocess_images`` for pixels, ``expand_prompt`` for ids, ``__call__`` for both.

    ``max_soft_tokens`` is the per-image budget of soft tokens (one of 70, 140, 280, 560, 1120; an image uses at
    most this many). It defaults to ``config.vision_soft_tokens_per_image`` when that is a supported budget, else
    to the reference's 280.
    """

    def __init__(self, config: Gemma4Config, max_soft_tokens: int | None = None) -> None:
        if max_soft_tokens is None:
            per_image = config.vision_soft_tokens_per_image
            max_soft_tokens = per_image if per_image in SUPPORTED_SOFT_TOKENS else DEFAULT_SOFT_TOKENS
        if max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise ValueError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {max_soft_tokens}")
        self.config = config
        self.max_soft_tokens = max_soft_tokens

    # ---- images -------------------------------------------------------------------------------------------------
    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self._vision().pooling_kernel_size ** 2

    def _vision(self) -> VisionConfig:
        if self.config.vision is None:
            raise ValueError("this config has no vision tower, so it cannot take images")
        return self.config.vision

    def preprocess_images(self, images: ImageInput | list[ImageInput]) -> dict[str, Any]:
        """One image or a list → ``pixel_values`` float32 [N, max_patches, 3·p²], ``image_position_ids`` int64
        [N, max_patches, 2] and ``num_soft_tokens`` (a list of N ints)."""
        v = self._vision()
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("no images given")
        p, k = v.patch_size, v.pooling_kernel_size
        pixel_values = np.zeros((len(images), self.max_patches, 3 * p * p), dtype=np.float32)
        positions = np.full((len(images), self.max_patches, 2), -1, dtype=np.int64)
        num_soft_tokens = []
        for i, image in enumerate(images):
            rgb = to_rgb_array(image)
            h, w = aspect_preserving_size(rgb.shape[0], rgb.shape[1], p, self.max_patches, k)
            if max(h, w) // p > v.position_embedding_size:
                raise ValueError(
                    f"image {rgb.shape[0]}x{rgb.shape[1]} resizes to {h}x{w} px = {h // p}x{w // p} patches, more "
                    f"than the position table's {v.position_embedding_size} per side: lower max_soft_tokens"
                )
            patches, pos = patchify(resize_and_rescale(rgb, h, w), p)
            pixel_values[i, : len(patches)] = patches
            positions[i, : len(patches)] = pos
            num_soft_tokens.append(len(patches) // k**2)
        return {
            "pixel_values": torch.from_numpy(pixel_values),
            "image_position_ids": torch.from_numpy(positions),
            "num_soft_tokens": num_soft_tokens,
        }

    # ---- prompts ------------------------------------------------------------------------------------------------
    def mm_token_type_ids(self, input_ids: Tensor) -> Tensor:
        """The reference's modality ids: 1 image soft token, 2 video, 3 audio, 0 anything else (boi/eoi included).
        The text model attends bidirectionally within each contiguous run of 1s (or 2s)."""
        c = self.config
        types = torch.zeros_like(input_ids)
        types[input_ids == c.image_token_id] = 1
        types[input_ids == c.video_token_id] = 2
        types[input_ids == c.audio_token_id] = 3
        return types

    def expand_prompt(self, input_ids: list[int] | Tensor, num_soft_tokens: list[int]) -> tuple[Tensor, Tensor]:
        """Replace the i-th ``image_token_id`` with ``[boi] + num_soft_tokens[i] × [image_token_id] + [eoi]``.

        Returns 1-D int64 ``(input_ids, mm_token_type_ids)``.
        """
        ids = _as_id_list(input_ids)
        c = self.config
        n_placeholders = ids.count(c.image_token_id)
        if n_placeholders != len(num_soft_tokens):
            raise ValueError(
                f"the prompt has {n_placeholders} image placeholder(s) (token id {c.image_token_id}) but "
                f"{len(num_soft_tokens)} image(s) were given"
            )
        if any(int(n) < 1 for n in num_soft_tokens):
            raise ValueError(f"every image needs at least one soft token, got {list(num_soft_tokens)}")
        counts = iter(num_soft_tokens)
        out: list[int] = []
        for t in ids:
            if t == c.image_token_id:
                out += [c.boi_token_id, *[c.image_token_id] * int(next(counts)), c.eoi_token_id]
            else:
                out.append(t)
        expanded = torch.tensor(out, dtype=torch.long)
        return expanded, self.mm_token_type_ids(expanded)

    def __call__(
        self,
        input_ids: list[int] | list[list[int]] | Tensor,
        images: ImageInput | list[ImageInput] | list[list[ImageInput]] | None = None,
    ) -> dict[str, Tensor]:
        """One prompt (ids [T]) with its images, or B prompts (ids [B, T] / a list of lists) with one list of images
        each. Returns ``input_ids`` and ``mm_token_type_ids`` [B, T'] and, with images, ``pixel_values`` and
        ``image_position_ids`` for all images in prompt order.

        Prompts must have equal lengths after expansion: this builds a padded rectangle only in the trivial case.
        Prompts of different lengths go through the model's packed API one prompt at a time.
        """
        prompts, per_prompt_images = _split_batch(input_ids, images)
        flat = [img for imgs in per_prompt_images for img in imgs]
        out: dict[str, Tensor] = {}
        counts: list[int] = []
        if flat:
            pre = self.preprocess_images(flat)
            out = {"pixel_values": pre["pixel_values"], "image_position_ids": pre["image_position_ids"]}
            counts = pre["num_soft_tokens"]
        ids, types, start = [], [], 0
        for prompt, imgs in zip(prompts, per_prompt_images):
            e_ids, e_types = self.expand_prompt(prompt, counts[start : start + len(imgs)])
            start += len(imgs)
            ids.append(e_ids)
            types.append(e_types)
        lengths = [len(x) for x in ids]
        if len(set(lengths)) > 1:
            raise ValueError(
                f"prompts expand to different lengths {lengths}: process them one at a time (the model's packed API "
                "takes prompts of any length)"
            )
        return {"input_ids": torch.stack(ids), "mm_token_type_ids": torch.stack(types), **out}


def _as_id_list(input_ids: list[int] | Tensor) -> list[int]:
    if isinstance(input_ids, Tensor):
        if input_ids.ndim != 1 or input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be a 1-D integer tensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
        return input_ids.tolist()
    if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in input_ids):
        raise TypeError("input_ids must be a list of ints or a 1-D integer tensor")
    return [int(t) for t in input_ids]


def _split_batch(input_ids: Any, images: Any) -> tuple[list[Any], list[list[ImageInput]]]:
    """Normalise (one prompt, its images) or (B prompts, B image lists) to lists of prompts and image lists."""
    if isinstance(input_ids, Tensor):
        if input_ids.ndim not in (1, 2):
            raise ValueError(f"input_ids must be [T] or [B, T], got shape {tuple(input_ids.shape)}")
        batched = input_ids.ndim == 2
    elif isinstance(input_ids, (list, tuple)):
        if len(input_ids) == 0:
            raise ValueError("input_ids is empty")
        batched = all(isinstance(p, (list, tuple, Tensor)) for p in input_ids)
    else:
        raise TypeError(f"input_ids must be a list or a tensor, got {type(input_ids).__name__}")
    if not batched:
        if images is None:
            imgs = []
        else:
            imgs = list(images) if isinstance(images, (list, tuple)) else [images]
        return [input_ids], [imgs]
    prompts = list(input_ids)
    if images is None:
        return prompts, [[] for _ in prompts]
    if not isinstance(images, (list, tuple)) or len(images) != len(prompts):
        raise ValueError(f"with {len(prompts)} prompts, images must be a list of {len(prompts)} lists of images")
    lists = [[] if imgs is None else list(imgs) if isinstance(imgs, (list, tuple)) else [imgs] for imgs in images]
    return prompts, lists
