"""The compiler's version of the piecewise runner: ``torch.compile`` on each piece between attention calls.

This is the layout serving engines use for prefill (vLLM's piecewise compile): the decoder program of
``gemma4lab.model.decoder`` is cut at attention exactly as ``PiecewiseCudaGraphRunner`` cuts it, each piece is
compiled (with ``mode="reduce-overhead"`` the compiler also captures it in a CUDA graph per shape), and attention runs
between the pieces on the real tokens. The hand-written runner stays the lesson — static buffers, buckets, padding
that cannot leak; this one shows what the compiler does with the same cut, and the benchmark sets them side by side.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from gemma4lab.model.decoder import Stream, piece, program_key, run_decoder


class CompiledPieces:
    """Prefill of text prompts with every piece compiled (dynamic shapes: one compilation per piece serves every
    prompt length). ``mode`` is torch.compile's mode; the pieces are recompiled when the model's settings change."""

    def __init__(self, model, *, mode: str = "default") -> None:
        if mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ValueError(f"unknown torch.compile mode {mode!r}")
        self.model, self.lm, self.mode = model, model.language_model, mode
        self._key: tuple | None = None
        self._piece = None

    def _compiled(self):
        key = program_key(self.lm)
        if key != self._key:
            from gemma4lab.attention.backends import _raise_recompile_limit

            # one compiled graph per piece index (each piece reads its own layers' weights)
            _raise_recompile_limit(4 * (len(self.lm.layers) + 1))
            self._piece = torch.compile(piece, dynamic=True, mode=self.mode)
            self._key = key
        return self._piece

    @torch.no_grad()
    def prefill(self, prompts: list[Tensor], *, all_logits: bool = False) -> Tensor:
        """Same contract as ``model.prefill`` for text prompts: logits of each prompt's last token (or of all)."""
        model, lm = self.model, self.lm
        ids, batch = model.pack_prompts(prompts, None)
        embeds = model.embed_inputs(ids, None, None, image_tokens=batch.image_tokens)
        ctx = lm.make_context(batch)
        s = Stream(embeds)
        compiled = self._compiled()
        if self.mode == "reduce-overhead":
            # each prefill is one step of the compiler's CUDA-graph trees: without this mark the trees took the
            # second prefill's pieces for a continuation of the first and failed (H200, torch 2.11)
            torch.compiler.cudagraph_mark_step_begin()
        pieces = [functools.partial(compiled, lm, j, s, ctx.cos_sin, lm.fusion) for j in range(len(lm.layers) + 1)]
        attend = lambda i, q, k, v: lm.attend(i, q, k, v, ctx)  # noqa: E731
        hidden = run_decoder(lm, s, ctx.cos_sin, attend, lm.fusion, pieces=pieces)
        return lm.logits(hidden if all_logits else hidden[batch.last_token_rows])
