"""Several prompts of different lengths packed into one ``[num_tokens, ...]`` batch, and where each one lives."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PackedBatch:
    """Where each prompt lives inside the packed rows.

    ``seq_lens`` stays on the host (it decides Python-level loops and shapes); everything else is on the device.
    ``block_ids`` marks image soft tokens: -1 for text, otherwise an id unique within the pack, so that tokens
    of one image attend to each other bidirectionally on sliding layers.
    """

    seq_lens: list[int]
    positions: Tensor  # [N] int64, 0-based position inside its prompt
    doc_ids: Tensor  # [N] int32, which prompt a row belongs to
    block_ids: Tensor | None = None  # [N] int64, image block id or -1

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    @property
    def last_token_rows(self) -> Tensor:
        ends = torch.tensor(self.seq_lens, device=self.positions.device).cumsum(0) - 1
        return ends

    def prompt_slices(self) -> list[slice]:
        """The rows of each prompt, in order (host-side: for per-prompt loops)."""
        out, start = [], 0
        for n in self.seq_lens:
            out.append(slice(start, start + n))
            start += n
        return out

    @classmethod
    def from_lengths(
        cls, seq_lens: list[int], device: torch.device | str = "cpu", block_ids: Tensor | None = None
    ) -> PackedBatch:
        if not seq_lens or any(n <= 0 for n in seq_lens):
            raise ValueError(f"every prompt needs at least one token, got lengths {seq_lens}")
        positions = torch.cat([torch.arange(n) for n in seq_lens]).to(device)
        doc_ids = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(seq_lens)]).to(device)
        return cls(list(seq_lens), positions, doc_ids, block_ids)


def image_block_ids(mm_token_type_ids: Tensor) -> Tensor:
    """Per-row image block id for one or more rows of ``mm_token_type_ids`` ([B, T] or [T]).

    A block is a maximal run of image soft tokens (type 1 or 2); boi/eoi are text. Ids are unique across the
    whole tensor so that packing prompts can never merge two images.
    """
    t = mm_token_type_ids.reshape(-1)
    is_img = (t == 1) | (t == 2)
    prev = torch.roll(is_img, 1)
    prev[0] = False
    if mm_token_type_ids.dim() == 2:  # a new row starts a new block even if both rows hold image tokens
        prev.view(mm_token_type_ids.shape)[:, 0] = False
    starts = is_img & ~prev
    ids = torch.cumsum(starts.long(), 0) - 1
    return torch.where(is_img, ids, torch.full_like(ids, -1))
