"""Several prompts of different lengths packed into one ``[num_tokens, ...]`` batch, and where each one lives."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PackedBatch:
    """Where each prompt lives inside the packed rows.

    ``seq_lens`` and ``cached`` stay on the host (they decide Python-level loops and shapes); everything else is on
    the device. ``block_ids`` marks image soft tokens: -1 for text, otherwise an id unique within the pack, so that
    tokens of one image attend to each other bidirectionally on sliding layers. ``cached[b]`` > 0 makes prompt b's
    rows a *chunk* (chunked prefill): they continue its earlier ``cached[b]`` tokens, whose keys are in the KV cache.
    """

    seq_lens: list[int]
    positions: Tensor  # [N] int64, position inside its prompt (from cached[b] on)
    doc_ids: Tensor  # [N] int32, which prompt a row belongs to
    block_ids: Tensor | None = None  # [N] int64, image block id or -1
    cached: list[int] | None = None  # tokens of each prompt before its rows (in the KV cache); None: all 0
    image_tokens: int | None = None  # image placeholders among the ids, read with their range check; None: unknown

    def __post_init__(self) -> None:
        if self.cached is None:
            self.cached = [0] * len(self.seq_lens)
        if len(self.cached) != len(self.seq_lens) or any(c < 0 for c in self.cached):
            raise ValueError(f"cached must give a count >= 0 per prompt, got {self.cached} for {self.seq_lens}")

    @property
    def chunked(self) -> bool:
        """Some prompt continues earlier tokens: its attention needs their keys from the KV cache."""
        return any(self.cached)

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    @property
    def last_token_rows(self) -> Tensor:
        """Each prompt's last row, on the device: built once per batch (a host-to-device copy and a scan; a prefill
        asks twice, for the graphs' static input and for the head). ``seq_lens`` is fixed once a batch exists. Not
        ``functools.cached_property``: its lock is a context manager torch.compile cannot trace; under compile the
        rows are built in the graph and not kept."""
        rows = self.__dict__.get("_last_token_rows")
        if rows is None:
            rows = torch.tensor(self.seq_lens, device=self.positions.device).cumsum(0) - 1
            if not torch.compiler.is_compiling():
                self.__dict__["_last_token_rows"] = rows
        return rows

    def prompt_slices(self) -> list[slice]:
        """The rows of each prompt, in order (host-side: for per-prompt loops)."""
        out, start = [], 0
        for n in self.seq_lens:
            out.append(slice(start, start + n))
            start += n
        return out

    def key_slices(self, prefix_lens: list[int]) -> list[slice]:
        """Each prompt's rows in the keys its queries attend to: ``prefix_lens[b]`` cached keys, then its own rows
        (the layout ``KVCache.with_prefix`` builds and the backends read; the prompt's rows when nothing is cached)."""
        out, start = [], 0
        for p, n in zip(prefix_lens, self.seq_lens):
            out.append(slice(start, start + p + n))
            start += p + n
        return out

    def chunk(self, start: int, end: int) -> PackedBatch:
        """Rows ``[start, end)`` of a one-prompt batch as a chunk of its own: the rows before it are cached. Image
        block ids (increasing along the rows) are renumbered from 0, as a pack of the chunk alone would number them."""
        if len(self.seq_lens) != 1 or self.cached[0]:
            raise ValueError("only a whole single prompt splits into chunks")
        if not 0 <= start < end <= self.num_tokens:
            raise ValueError(f"chunk [{start}, {end}) is not inside the prompt's {self.num_tokens} tokens")
        blocks = None
        if self.block_ids is not None:
            blocks = self.block_ids[start:end]
            first = torch.where(blocks >= 0, blocks, blocks.new_full((), 1 << 62)).min()  # device op, no sync
            blocks = torch.where(blocks >= 0, blocks - first, -1)
        return PackedBatch([end - start], self.positions[start:end], self.doc_ids[start:end], blocks, [start])

    @classmethod
    def from_lengths(
        cls, seq_lens: list[int], device: torch.device | str = "cpu", block_ids: Tensor | None = None,
        cached: list[int] | None = None,
    ) -> PackedBatch:
        if not seq_lens or any(n <= 0 for n in seq_lens):
            raise ValueError(f"every prompt needs at least one token, got lengths {seq_lens}")
        cached = list(cached) if cached is not None else [0] * len(seq_lens)
        if len(cached) != len(seq_lens):
            raise ValueError(f"cached must give a count per prompt, got {cached} for {seq_lens}")
        positions = torch.cat([torch.arange(c, c + n) for c, n in zip(cached, seq_lens)]).to(device)
        doc_ids = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(seq_lens)]).to(device)
        return cls(list(seq_lens), positions, doc_ids, block_ids, cached)


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
