"""The multimodal model: vision tower + projector + text decoder, with the reference's module tree.

Parameter names equal Hugging Face's ``Gemma4ForConditionalGeneration`` state-dict keys
(``model.language_model.*``, ``model.vision_tower.*``, ``model.embed_vision.*``; ``lm_head`` is tied to the token
embeddings), so a checkpoint loads by name with no renaming table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gemma4lab.attention import PackedBatch, image_block_ids
from gemma4lab.model.config import Gemma4Config
from gemma4lab.model.text import TextModel
from gemma4lab.runtime.fusion import Fusion


@dataclass
class ModelOutput:
    logits: Tensor


class _Inner(nn.Module):
    """Holds the sub-modules under ``model.`` exactly as the reference nests them."""

    def __init__(self, cfg: Gemma4Config) -> None:
        super().__init__()
        self.language_model = TextModel(cfg.text)
        if cfg.vision is not None:
            from gemma4lab.model.vision import MultimodalEmbedder, VisionTower

            self.vision_tower = VisionTower(cfg.vision)
            v = cfg.vision
            self.embed_vision = MultimodalEmbedder(v.hidden_size, cfg.text.hidden_size, v.rms_norm_eps)
        else:
            self.vision_tower = None
            self.embed_vision = None


class Gemma4ForConditionalGeneration(nn.Module):
    """Gemma 4 vision-language model. ``forward`` takes the reference's tensors; ``prefill`` takes packed prompts."""

    def __init__(self, config: Gemma4Config) -> None:
        super().__init__()
        self.config = config
        self.model = _Inner(config)
        self.init_buffers()

    def init_buffers(self) -> None:
        """The buffers checkpoints do not store (RoPE frequencies, placeholder ids), e.g. after ``to_empty``."""
        c = self.config
        self.language_model.init_buffers([c.image_token_id, c.video_token_id, c.audio_token_id])

    # ---- conveniences ---------------------------------------------------------------------------------------------
    @property
    def language_model(self) -> TextModel:
        return self.model.language_model

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embed_tokens.weight.dtype

    def set_fusion(self, fusion: Fusion | str) -> Gemma4ForConditionalGeneration:
        """Switch fused kernels on or off: a ``Fusion`` or ``"none"`` / ``"all"`` / ``"published"``."""
        self.language_model.fusion = Fusion.parse(fusion)
        if self.model.vision_tower is not None:  # the encoder takes the decoder's switches
            self.model.vision_tower.encoder.fusion = self.language_model.fusion
        return self

    def set_attention_backend(self, backend: str) -> Gemma4ForConditionalGeneration:
        """``auto``: our Triton kernel on a GPU, masked SDPA (the reference) on CPU; or force ``triton``, ``flex``
        (FlexAttention, with causal SDPA for short text prompts) or ``sdpa``."""
        if backend not in ("auto", "triton", "sdpa", "flex"):
            raise ValueError(f"attention backend must be 'auto', 'triton', 'sdpa' or 'flex', got {backend!r}")
        self.language_model.attn_backend = backend
        return self

    # ---- input checks and embedding -------------------------------------------------------------------------------
    def _check_ids(self, input_ids: Tensor, count_token: int | None = None) -> int | None:
        """Type, emptiness and range of the ids; with ``count_token``, also how many ids equal it (the image
        placeholders), read back in the same host round trip. Returns that count (None without ``count_token``, or
        under torch.compile, where the values are data and are not read)."""
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty: a prompt needs at least one token")
        if torch.compiler.is_compiling():  # the values are data: checked on every eager call, trusted in a graph
            return None
        stats = [*torch.aminmax(input_ids)]
        if count_token is not None:
            stats.append((input_ids == count_token).sum())
        # one host read (none for ids still on the CPU): on a GPU each read is a round trip with the device idle
        lo, hi, *count = torch.stack([x.long() for x in stats]).tolist()
        vocab = self.config.text.vocab_size
        if lo < 0 or hi >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab}), got values in [{lo}, {hi}]")
        return count[0] if count else None

    def image_features(self, pixel_values: Tensor, image_position_ids: Tensor, *,
                       tower: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
        """Soft tokens of every image, projected into the text space: [total_soft_tokens, hidden]. ``tower`` runs
        in place of ``model.vision_tower`` with its signature (the CUDA graphs of ``TowerGraphs``)."""
        if self.model.vision_tower is None:
            raise ValueError("this model has no vision tower (vision_config is null) but pixel_values were given")
        if image_position_ids is None:
            raise ValueError("pixel_values needs image_position_ids (from gemma4lab.Gemma4Processor)")
        if pixel_values.dim() != 3 or image_position_ids.dim() != 3 or image_position_ids.shape[-1] != 2:
            raise ValueError(
                "expected pixel_values [num_images, max_patches, 3*patch^2] and image_position_ids "
                f"[num_images, max_patches, 2], got {tuple(pixel_values.shape)} and {tuple(image_position_ids.shape)}"
            )
        check_pixels(pixel_values, image_position_ids, self.config.vision.position_embedding_size)
        # Pixels stay fp32: the tower's first op (2·(p − 0.5)) runs in fp32 in the reference too.
        soft = (tower or self.model.vision_tower)(pixel_values.to(self.device), image_position_ids.to(self.device))
        return self.model.embed_vision(soft)

    def embed_inputs(self, input_ids: Tensor, pixel_values: Tensor | None, image_position_ids: Tensor | None, *,
                     tower: Callable[[Tensor, Tensor], Tensor] | None = None,
                     image_tokens: int | None = None) -> Tensor:
        """Token embeddings with the image placeholders replaced by the vision tower's soft tokens (``tower``: see
        ``image_features``). ids: [N]. ``image_tokens``: the placeholder count if already read (``pack_prompts``
        reads it with the ids' range check: ``PackedBatch.image_tokens``), else it is read here."""
        cfg = self.config
        embeds = self.language_model.embed(input_ids)  # placeholders embed as padding
        if pixel_values is None and torch.compiler.is_compiling():
            return embeds  # a text prompt under torch.compile: the placeholder count is data, checked eagerly
        n_slots = int((input_ids == cfg.image_token_id).sum()) if image_tokens is None else image_tokens
        if pixel_values is None:
            if n_slots:
                raise ValueError(f"the prompt has {n_slots} image placeholder tokens but no pixel_values were given")
            return embeds
        feats = self.image_features(pixel_values, image_position_ids, tower=tower)
        if feats.shape[0] != n_slots:
            raise ValueError(
                f"the prompt has {n_slots} image soft-token slots but the images give {feats.shape[0]} soft tokens "
                "(more image placeholders than images, or a prompt not expanded by Gemma4Processor)"
            )
        mask = (input_ids == cfg.image_token_id)[:, None]
        return embeds.masked_scatter(mask, feats.to(embeds.dtype))

    def packed_batch(self, seq_lens: list[int], mm_token_type_ids: Tensor | None) -> PackedBatch:
        blocks = None
        if mm_token_type_ids is not None and mm_token_type_ids.numel() != sum(seq_lens):
            raise ValueError(f"mm_token_type_ids has {mm_token_type_ids.numel()} entries for {sum(seq_lens)} tokens")
        if mm_token_type_ids is not None and self.config.text.use_bidirectional_attention == "vision":
            blocks = image_block_ids(mm_token_type_ids.to(self.device).reshape(-1))
            # Blocks never cross prompt boundaries: a new prompt restarts the run.
            starts = torch.tensor([0] + list(seq_lens[:-1]), device=self.device).cumsum(0)
            if len(seq_lens) > 1:
                blocks = _split_blocks_at(blocks, starts)
        return PackedBatch.from_lengths(seq_lens, self.device, blocks)

    def pack_prompts(self, prompts: list[Tensor], mm_token_type_ids: list[Tensor] | None) -> tuple[Tensor, PackedBatch]:
        """Checked, concatenated token ids [N] and where each prompt lives in them (shared with the PCG runner)."""
        if not prompts:
            raise ValueError("prefill needs at least one prompt")
        for p in prompts:
            if not isinstance(p, Tensor) or p.dim() != 1:
                raise ValueError("each prompt must be a 1-D tensor of token ids")
        # ids still on the CPU (a tokenizer's) are checked there, before the copy: no device sync
        same_device = len({p.device for p in prompts}) == 1
        ids = torch.cat(list(prompts) if same_device else [p.to(self.device) for p in prompts])
        image_tokens = self._check_ids(ids, self.config.image_token_id)
        ids = ids.to(self.device)
        mm = None
        if mm_token_type_ids is not None:
            if len(mm_token_type_ids) != len(prompts):
                raise ValueError(f"{len(mm_token_type_ids)} mm_token_type_ids rows for {len(prompts)} prompts")
            mm = torch.cat([t.reshape(-1) for t in mm_token_type_ids]).to(self.device)
            self._check_token_types(ids, mm)
        batch = self.packed_batch([int(p.numel()) for p in prompts], mm)
        batch.image_tokens = image_tokens
        return ids, batch

    def _check_token_types(self, ids: Tensor, mm: Tensor) -> None:
        """``mm_token_type_ids`` must mark exactly the image soft tokens (type 1), so the attention masks built from
        it match the prompt; a mismatch would silently change the logits. One host read per prefill."""
        if mm.shape != ids.shape or mm.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"mm_token_type_ids must be int token types of the prompt's shape {tuple(ids.shape)}, "
                             f"got {mm.dtype} {tuple(mm.shape)}")
        is_image = ids == self.config.image_token_id
        marked = mm == 1
        if not torch.equal(is_image, marked) or bool(((mm != 0) & (mm != 1)).any()):
            bad = int((is_image != marked).sum())
            raise ValueError(f"mm_token_type_ids disagrees with input_ids at {bad} positions: it must be 1 exactly at "
                             f"the image token ({self.config.image_token_id}) and 0 elsewhere (use Gemma4Processor)")

    # ---- forward --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(
        self,
        prompts: list[Tensor],
        pixel_values: Tensor | None = None,
        image_position_ids: Tensor | None = None,
        mm_token_type_ids: list[Tensor] | None = None,
        *,
        all_logits: bool = False,
        cache=None,
        chunk_tokens: int | None = None,
    ) -> Tensor:
        """Packed prefill of several prompts of different lengths in one forward.

        Returns the logits of each prompt's last token [num_prompts, vocab], or of every token [N, vocab].
        Images (if any) belong to the prompts in order of their placeholders. ``chunk_tokens``: run one prompt as
        chunks of at most that many tokens over the KV cache (``gemma4lab.runtime.chunked``).
        """
        if chunk_tokens is not None:
            from gemma4lab.runtime.chunked import chunked_prefill

            return chunked_prefill(self, prompts, pixel_values, image_position_ids, mm_token_type_ids,
                                   chunk_tokens=chunk_tokens, all_logits=all_logits, cache=cache)
        ids, batch = self.pack_prompts(prompts, mm_token_type_ids)
        embeds = self.embed_inputs(ids, pixel_values, image_position_ids, image_tokens=batch.image_tokens)
        lm = self.language_model
        hidden = lm.forward_embeds(embeds, lm.make_context(batch, cache=cache))
        if not all_logits:
            hidden = hidden[batch.last_token_rows]
        return lm.logits(hidden)

    @torch.no_grad()
    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        image_position_ids: Tensor | None = None,
        mm_token_type_ids: Tensor | None = None,
    ) -> ModelOutput:
        """The reference's batch API: ``input_ids`` [B, T] (equal-length prompts) → ``.logits`` [B, T, vocab]."""
        return batch_forward(self.prefill, input_ids, pixel_values, image_position_ids, mm_token_type_ids)

    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        pixel_values: Tensor | None = None,
        image_position_ids: Tensor | None = None,
        mm_token_type_ids: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        """Greedy decoding with a KV cache → token ids [B, T + new] (see ``gemma4lab.generation``)."""
        from gemma4lab.runtime.generation import greedy_generate

        return greedy_generate(self, input_ids, max_new_tokens, pixel_values, image_position_ids, mm_token_type_ids,
                               **kwargs)


def batch_forward(prefill, input_ids: Tensor, pixel_values: Tensor | None, image_position_ids: Tensor | None,
                  mm_token_type_ids: Tensor | None) -> ModelOutput:
    """The [B, T] batch API on top of a packed ``prefill`` (the model's or the PCG runner's)."""
    if isinstance(input_ids, Tensor) and input_ids.dim() == 1:
        input_ids = input_ids[None]
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [batch, seq_len] tensor of token ids")
    b, t = input_ids.shape
    if mm_token_type_ids is not None and tuple(mm_token_type_ids.shape) != (b, t):
        raise ValueError(f"mm_token_type_ids must have the shape of input_ids {(b, t)}, got "
                         f"{tuple(mm_token_type_ids.shape)}")
    logits = prefill(list(input_ids), pixel_values, image_position_ids,
                     list(mm_token_type_ids) if mm_token_type_ids is not None else None, all_logits=True)
    return ModelOutput(logits=logits.view(b, t, -1))


def check_pixels(pixel_values: object, image_position_ids: object, table: int) -> None:
    """The processor's contract: float pixels in [0, 1] (not 0..255, not uint8, no NaN), integer positions inside
    the position-embedding table or -1 (padding). Checked on the host, once per prefill, outside any graph."""
    for name, t in (("pixel_values", pixel_values), ("image_position_ids", image_position_ids)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (from gemma4lab.Gemma4Processor), got {type(t).__name__}")
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be floating point in [0, 1] (Gemma4Processor rescales), got "
                        f"{pixel_values.dtype}")
    if image_position_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"image_position_ids must be int64/int32, got {image_position_ids.dtype}")
    # the four extremes in one read per device: on a GPU each read is a host round trip with the device idle behind it
    stats = [t for t in (pixel_values, image_position_ids) if t.numel()]
    groups = [stats] if len({t.device for t in stats}) == 1 else [[t] for t in stats]
    extremes = [v for g in groups for v in torch.stack([x.to(torch.float64) for t in g
                                                        for x in torch.aminmax(t)]).tolist()]
    if pixel_values.numel():
        lo, hi = extremes[:2]
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise ValueError(f"pixel_values must be finite and in [0, 1], got values in [{lo}, {hi}] (0..255 "
                             "pixels or a NaN? use Gemma4Processor)")
    if image_position_ids.numel():
        lo, hi = (int(v) for v in extremes[-2:])
        if lo < -1 or hi >= table:
            raise ValueError(f"image_position_ids must be -1 (padding) or in [0, {table}), the position table of "
                             f"the vision config, got values in [{lo}, {hi}]")


def _split_blocks_at(blocks: Tensor, starts: Tensor) -> Tensor:
    """Give every image block that continues across a prompt boundary a fresh id after the boundary."""
    is_img = blocks >= 0
    boundary = torch.zeros_like(is_img)
    boundary[starts] = True
    prev = torch.roll(blocks, 1)
    new = is_img & (boundary | (prev != blocks))
    ids = torch.cumsum(new.long(), 0) - 1
    return torch.where(is_img, ids, torch.full_like(ids, -1))
