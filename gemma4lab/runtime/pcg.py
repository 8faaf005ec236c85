"""Piecewise CUDA graphs for prefill.

At small and medium prompt lengths a prefill is bound by the CPU launching hundreds of kernels per layer. A CUDA
graph replays a recorded stream of kernels with one launch, but attention cannot live inside it: its cost and its
masks depend on the real prompt lengths. So each forward is cut at attention:

    piece 0: embed → layer 0 pre-attention      ┐
    attention 0 (eager, real token count)        │ replayed per token-count *bucket*:
    piece 1: layer 0 post-attention → layer 1 pre│ inputs are padded to the bucket,
    ...                                          │ attention sees only the real rows
    piece L: layer L-1 post-attention → final norm ┘ → logits of each prompt's last token

Design choices, and the production problems they avoid:

* **Static buffers, one set.** Every bucket's graphs read and write views of one set of buffers sized for the
  largest bucket, so graph memory does not grow with the number of buckets; intermediates inside a piece come
  from one shared graph pool, captured largest bucket first so smaller buckets reuse its blocks.
* **Padding cannot leak.** Every op in a piece is row-wise (norms, projections, routing, experts), and attention
  only reads real rows, so padded rows never reach a real token. A test fills the padding with garbage.
* **Long prompts are chunked, not sent to eager.** A prompt above the largest bucket runs as chunked prefill
  (``gemma4lab.runtime.chunked``): chunks of the largest bucket's size (the last one padded to its bucket) replay
  the same captured pieces at absolute positions, and the attention between pieces also reads the keys of the
  earlier chunks from the KV cache, so nothing new is captured and decode continues from that cache. The result is
  bit-identical to the eager model's chunked prefill (``model.prefill(..., chunk_tokens=max_tokens)``) and differs
  from an unchunked one by rounding only.
* **No silent fallback.** What chunking cannot serve (several prompts above the largest bucket, an image longer
  than a chunk, more prompts than the runner holds) runs the eager path; chunking and the eager path each warn
  once, and ``runner.stats`` counts every chunked prefill and every fallback.
* **Images replay the same graphs.** The vision tower replays graphs of its own, one per ``[images, patches]``
  shape (``gemma4lab.runtime.vision_graphs.TowerGraphs``); its soft tokens go into a static input-embeddings
  buffer that piece 0 selects with a mask, so text and image prompts share every text graph.
* **Same code on CPU.** Without CUDA the runner runs the identical split, padding and caching logic, with the
  pieces kept as Python closures instead of graphs, and says that no graphs were captured, so CI tests the logic.
* **Graphs know what they hold.** A captured graph replays the kernels of the model settings it was captured
  with. The runner records ``program_key`` (fused kernels, attention backend, dtype, routing bias) at capture; a
  later call with other settings drops the old graphs, says so, and captures again, instead of replaying stale ones.
* **One call at a time.** The static buffers are shared by every call, so concurrent calls are serialised by a lock.
"""

from __future__ import annotations

import bisect
import gc
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gemma4lab.attention import PackedBatch
from gemma4lab.model.decoder import Stream, piece, program_key, run_decoder
from gemma4lab.model.vision import VisionTower
from gemma4lab.runtime.chunked import ImageSplitError, chunked_prefill
from gemma4lab.runtime.kv_cache import KVCache
from gemma4lab.runtime.vision_graphs import TowerGraphs


def default_buckets(max_tokens: int = 8192) -> list[int]:
    """Token-count buckets in the spirit of sglang's: fine steps where padding would be a large fraction.

    4–32 step 4, 48–256 step 16, 288–512 step 32, 576–1024 step 64, 1280–4096 step 256, then step 512.
    Padding waste stays under a third above 16 tokens and under 20 % above 64.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    steps = [(4, 32, 4), (48, 256, 16), (288, 512, 32), (576, 1024, 64), (1280, 4096, 256), (4608, 1 << 30, 512)]
    out: list[int] = []
    for lo, hi, step in steps:
        out += [b for b in range(lo, hi + 1, step) if b <= max_tokens]
    if not out or out[-1] != max_tokens:
        out.append(max_tokens)
    return sorted(set(out))


def validate_buckets(buckets: list[int]) -> list[int]:
    if not isinstance(buckets, (list, tuple)) or not buckets:
        raise ValueError("buckets must be a non-empty list of token counts")
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in buckets):
        raise TypeError(f"buckets must be ints, got {buckets!r}")
    if any(b < 1 for b in buckets):
        raise ValueError(f"every bucket must be >= 1 token, got {sorted(buckets)}")
    if len(set(buckets)) != len(buckets):
        raise ValueError(f"buckets contain duplicates: {sorted(buckets)}")
    return sorted(buckets)


@dataclass
class CaptureReport:
    """What capture cost: wall time, graph-pool bytes, and the pieces per bucket."""

    graphs: bool
    buckets: list[int]
    capture_s: float = 0.0
    graph_pool_bytes: int = 0
    static_buffer_bytes: int = 0
    pieces_per_bucket: int = 0
    device: str = "cpu"

    def __str__(self) -> str:
        if not self.graphs:
            return (f"no CUDA graphs captured (device {self.device}): pieces run eagerly with the same padding "
                    f"over {len(self.buckets)} buckets")
        return (f"captured {len(self.buckets)} buckets × {self.pieces_per_bucket} pieces in {self.capture_s:.1f} s; "
                f"graph pool {self.graph_pool_bytes / 2**30:.2f} GiB, static buffers "
                f"{self.static_buffer_bytes / 2**30:.2f} GiB")


@dataclass
class _Buffers:
    """Static inputs/outputs shared by every bucket (views ``[:bucket]`` of max-size tensors)."""

    ids: Tensor
    positions: Tensor
    mm_embeds: Tensor
    mm_mask: Tensor
    last_rows: Tensor
    h: Tensor
    x: Tensor
    q: dict[bool, Tensor]
    k: dict[bool, Tensor]
    v: dict[bool, Tensor]
    o: dict[bool, Tensor]
    hidden: Tensor
    cos: dict[bool, Tensor] = field(default_factory=dict)
    sin: dict[bool, Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        ts = [self.ids, self.positions, self.mm_embeds, self.mm_mask, self.last_rows, self.h, self.x, self.hidden]
        for d in (self.q, self.k, self.v, self.o, self.cos, self.sin):
            ts += list(d.values())
        return sum(t.numel() * t.element_size() for t in ts)


class StaticStream(Stream):
    """The decoder's stream over ``[:n]`` views of the static buffers: every piece reads its inputs from and copies
    its outputs into the same memory, so a captured piece is valid on every replay."""

    def __init__(self, buf: _Buffers, n: int) -> None:  # no super().__init__: every field is a view below
        self.buf, self.n = buf, n
        self.has_x = False  # a Python fact of the program (fusion.next_norm), the same at capture and replay

    @property
    def h(self) -> Tensor:
        return self.buf.h[: self.n]

    @property
    def x(self) -> Tensor | None:
        return self.buf.x[: self.n] if self.has_x else None

    @property
    def hidden(self) -> Tensor:
        return self.buf.hidden[: self.n]

    def set_residual(self, h: Tensor, x: Tensor | None) -> None:
        self.buf.h[: self.n].copy_(h)
        self.has_x = x is not None
        if x is not None:
            self.buf.x[: self.n].copy_(x)

    def set_qkv(self, sliding: bool, q: Tensor, k: Tensor, v: Tensor) -> None:
        for buf, t in ((self.buf.q, q), (self.buf.k, k), (self.buf.v, v)):
            buf[sliding][: self.n].copy_(t)

    def qkv(self, sliding: bool) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(buf[sliding][: self.n] for buf in (self.buf.q, self.buf.k, self.buf.v))

    def set_o(self, sliding: bool, o: Tensor) -> None:
        self.buf.o[sliding][: o.shape[0]].copy_(o)  # attention returns the real rows only

    def attn_out(self, sliding: bool) -> Tensor:
        return self.buf.o[sliding][: self.n]

    def set_hidden(self, hidden: Tensor) -> None:
        self.buf.hidden[: self.n].copy_(hidden)


class PiecewiseCudaGraphRunner:
    """Prefill with piecewise CUDA graphs over token-count buckets (eager pieces on CPU).

    ``runner.prefill(prompts, ...)`` has the model's ``prefill`` signature and returns the same logits.
    """

    def __init__(
        self,
        model,
        *,
        buckets: list[int] | None = None,
        max_tokens: int = 8192,
        max_prompts: int = 16,
        use_graphs: bool | None = None,
        progress: bool = True,
        dependent_launch: bool | None = None,
    ) -> None:
        self.model = model
        self.lm = model.language_model
        self.device = model.device
        self.buckets = validate_buckets(list(buckets)) if buckets is not None else default_buckets(max_tokens)
        self.max_tokens = self.buckets[-1]
        self.max_prompts = max_prompts
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("use_graphs=True needs the model on a CUDA device")
        self.progress = progress
        #: capture the pieces' kernels with programmatic dependent launch (``gemma4lab.kernels.dependent_launch``;
        #: H200: 0.8 / 1.5 % faster at 93 / 189 tokens, the same logits). Default: wherever the device supports it
        from gemma4lab.kernels import dependent_launch_setting

        self.dependent_launch = dependent_launch_setting(dependent_launch, self.device)
        self.stats = {"replays": 0, "chunked_prefills": 0, "eager_fallbacks": 0, "padded_tokens": 0,
                      "real_tokens": 0, "recaptures": 0}
        self._warned: set[str] = set()
        #: bucket -> its pieces: captured graphs (CUDA) or the Python closures themselves (CPU), all of one program
        self._entries: dict[int, list] = {}
        self._key: tuple | None = None  # program_key of what _entries hold
        self._pool = None
        self._lock = threading.RLock()
        tower = getattr(getattr(model, "model", None), "vision_tower", None)
        #: the vision tower's own graphs (None for a text-only model, or a tower that is not gemma4lab's)
        self.tower = TowerGraphs(tower, use_graphs=self.use_graphs) if isinstance(tower, VisionTower) else None
        self._check_memory()
        self.buf = self._allocate()
        self.report = CaptureReport(graphs=False, buckets=self.buckets, device=str(self.device),
                                    static_buffer_bytes=self.buf.nbytes(),
                                    pieces_per_bucket=len(self.lm.layers) + 1)

    # ---- buffers -------------------------------------------------------------------------------------------------
    def _check_memory(self) -> None:
        est = self._allocate("meta").nbytes()  # the buffers' exact shapes and dtypes, no memory taken
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
        else:
            import os

            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if est > 0.8 * free:
            raise ValueError(
                f"max_tokens={self.max_tokens} needs about {est / 2**30:.1f} GiB of static buffers but only "
                f"{free / 2**30:.1f} GiB are free on {self.device}: lower max_tokens"
            )

    def _allocate(self, device: torch.device | str | None = None) -> _Buffers:
        """The static buffers on ``device`` (the model's by default; ``"meta"`` sizes them without memory)."""
        cfg, n, dev, dt = self.lm.config, self.max_tokens, device or self.device, self.model.dtype
        types = {cfg.is_sliding(i): i for i in range(cfg.num_hidden_layers)}
        q, k, v, o = {}, {}, {}, {}
        for sliding, i in types.items():
            d, hq, hkv = cfg.layer_head_dim(i), cfg.num_attention_heads, cfg.layer_kv_heads(i)
            q[sliding] = torch.zeros(n, hq, d, dtype=dt, device=dev)
            k[sliding] = torch.zeros(n, hkv, d, dtype=dt, device=dev)
            v[sliding] = torch.zeros(n, hkv, d, dtype=dt, device=dev)
            o[sliding] = torch.zeros(n, hq, d, dtype=dt, device=dev)
        hs = cfg.hidden_size
        buf = _Buffers(
            ids=torch.zeros(n, dtype=torch.long, device=dev),
            positions=torch.zeros(n, dtype=torch.long, device=dev),
            mm_embeds=torch.zeros(n, hs, dtype=dt, device=dev),
            mm_mask=torch.zeros(n, dtype=torch.bool, device=dev),
            last_rows=torch.zeros(self.max_prompts, dtype=torch.long, device=dev),
            h=torch.zeros(n, hs, dtype=dt, device=dev),
            x=torch.zeros(n, hs, dtype=dt, device=dev),
            q=q, k=k, v=v, o=o,
            hidden=torch.zeros(n, hs, dtype=dt, device=dev),
        )
        for sliding, i in types.items():
            d = cfg.layer_head_dim(i)
            buf.cos[sliding] = torch.zeros(n, d, dtype=torch.float32, device=dev)
            buf.sin[sliding] = torch.zeros(n, d, dtype=torch.float32, device=dev)
        return buf

    # ---- the pieces ----------------------------------------------------------------------------------------------
    def _pieces(self, n: int) -> list[Callable[[], None]]:
        """The decoder program's pieces over ``[:n]`` views of the static buffers; piece 0 also builds its inputs
        (embeddings with image soft tokens merged in, RoPE tables) from the static ids and positions."""
        lm, b, fusion = self.lm, self.buf, self.lm.fusion
        s = StaticStream(b, n)
        cos_sin = {sliding: (b.cos[sliding][:n], b.sin[sliding][:n]) for sliding in b.cos}

        def first() -> None:
            e = lm.embed(b.ids[:n])
            s.set_residual(torch.where(b.mm_mask[:n, None], b.mm_embeds[:n], e), None)
            for sliding, (c, si) in lm.rope(b.positions[:n]).items():
                b.cos[sliding][:n].copy_(c)
                b.sin[sliding][:n].copy_(si)
            piece(lm, 0, s, cos_sin, fusion)

        def later(j: int) -> Callable[[], None]:
            return lambda: piece(lm, j, s, cos_sin, fusion)

        return [first] + [later(j) for j in range(1, len(lm.layers) + 1)]

    # ---- capture -------------------------------------------------------------------------------------------------
    def _check_program(self) -> None:
        """Drop every cached piece if the model's settings changed since they were made (see ``program_key``)."""
        key = program_key(self.lm)
        if key == self._key:
            return
        if self._entries:
            warnings.warn(f"PiecewiseCudaGraphRunner: the model's settings changed since capture ({self._key} -> "
                          f"{key}); the old graphs are dropped and captured again", stacklevel=4)
            self.stats["recaptures"] += 1
            self._entries.clear()
            self._pool = None
            if self.tower is not None:
                self.tower.reset()
            if self.use_graphs:
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
        self._key = key

    def piece_graphs(self, bucket: int) -> list:
        """The captured graphs of ``bucket`` (empty before capture or without CUDA): for replay-cost measurements."""
        return list(self._entries.get(bucket, [])) if self.use_graphs else []

    @property
    def captured_key(self) -> tuple | None:
        """The ``program_key`` of the model settings the cached pieces were made with (None before capture)."""
        return self._key if self._entries else None

    @torch.no_grad()
    def capture(self) -> CaptureReport:
        """Record every bucket's pieces (largest first, one shared pool). Without CUDA the pieces stay Python
        closures (made per bucket on first use) and the report says no graphs were captured. Under ``no_grad``
        whatever the caller's mode, as a replay runs: the packed projections' one GEMM is a no-grad path
        (``gemma4lab.model.packing``), so a capture in grad mode would record another program."""
        with self._lock:
            self._check_program()
            if not self.use_graphs:
                self.report.graphs = False
                return self.report
            return self._capture_graphs()

    def _capture_graphs(self) -> CaptureReport:
        from gemma4lab.kernels import dependent_launch

        with dependent_launch(self.dependent_launch):
            return self._capture_buckets()

    def _capture_buckets(self) -> CaptureReport:
        from tqdm.auto import tqdm

        # so that the reserved-memory delta is the graph pool alone: unreachable tensors collected *now*, not by a gc
        # pass during capture (whose freed blocks the final empty_cache would subtract from the pool's size)
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(self.device)
        t0 = time.perf_counter()
        self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        order = sorted(self.buckets, reverse=True)
        bar = tqdm(order, desc="capturing PCG buckets", disable=not self.progress)
        for n in bar:
            self._fill_dummy(n)
            pieces = self._pieces(n)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up on the capture stream (compiles kernels, creates handles)
                for p in pieces:
                    p()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graphs = []
            for j, p in enumerate(pieces):
                g = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(g, pool=self._pool, stream=stream):
                        p()
                except Exception as e:
                    raise RuntimeError(
                        f"capturing piece {j} of bucket {n} failed: something in it synchronises with the host or "
                        f"changes shape with the data ({type(e).__name__}: {e})"[:600]
                    ) from e
                graphs.append(g)
            self._entries[n] = graphs
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        self.report.graphs = True
        self.report.capture_s = time.perf_counter() - t0
        self.report.graph_pool_bytes = torch.cuda.memory_reserved(self.device) - before
        return self.report

    def _pieces_for(self, bucket: int) -> list[Callable[[], None]]:
        """What replays bucket ``bucket``: its graphs' ``replay`` (capturing every bucket first if needed), or its
        cached Python pieces on CPU; always of the model's current program."""
        self._check_program()
        if bucket not in self._entries:
            if self.use_graphs:
                self._capture_graphs()
            else:
                self._entries[bucket] = self._pieces(bucket)
        entry = self._entries[bucket]
        return [g.replay for g in entry] if self.use_graphs else entry

    def _fill_dummy(self, n: int) -> None:
        b = self.buf
        b.ids[:n].fill_(self.lm.config.pad_token_id)
        b.positions[:n].copy_(torch.arange(n, device=self.device))
        b.mm_mask[:n].fill_(False)
        b.last_rows.fill_(n - 1)
        for t in b.o.values():
            t[:n].normal_()

    # ---- replay --------------------------------------------------------------------------------------------------
    def bucket_for(self, n_tokens: int) -> int | None:
        i = bisect.bisect_left(self.buckets, n_tokens)
        return self.buckets[i] if i < len(self.buckets) else None

    def _announce(self, stat: str, message: str) -> None:
        """Count a prefill that is not one bucket's replay in ``stats[stat]``; warn once per kind."""
        self.stats[stat] += 1
        if stat not in self._warned:
            warnings.warn(f"PiecewiseCudaGraphRunner: {message} (said once; runner.stats[{stat!r}] counts every "
                          "time)", stacklevel=5)  # the caller of prefill (under no_grad)
            self._warned.add(stat)

    @torch.no_grad()
    def prefill(
        self,
        prompts: list[Tensor],
        pixel_values: Tensor | None = None,
        image_position_ids: Tensor | None = None,
        mm_token_type_ids: list[Tensor] | None = None,
        *,
        all_logits: bool = False,
        cache: KVCache | None = None,
        pad_fill: Callable[[_Buffers, int, int], None] | None = None,
    ) -> Tensor:
        """Same contract as ``model.prefill``. ``pad_fill(buffers, n_real, bucket)`` lets tests write garbage.
        Concurrent calls run one after the other (the static buffers are shared)."""
        with self._lock:
            return self._prefill(prompts, pixel_values, image_position_ids, mm_token_type_ids, all_logits, cache,
                                 pad_fill)

    def _prefill(self, prompts, pixel_values, image_position_ids, mm_token_type_ids, all_logits, cache,
                 pad_fill) -> Tensor:
        model = self.model
        n_real = sum(int(p.numel()) for p in prompts)
        why = None
        if len(prompts) > self.max_prompts:
            why = f"{len(prompts)} prompts exceed max_prompts={self.max_prompts}"
        elif n_real > self.max_tokens and len(prompts) > 1:
            why = (f"{len(prompts)} prompts of {n_real} tokens exceed the largest bucket ({self.max_tokens}) and "
                   "chunked prefill takes one prompt at a time")
        elif n_real > self.max_tokens:
            def run(ids: Tensor, embeds: Tensor, batch: PackedBatch, c: KVCache) -> Tensor:
                return self._forward(ids, embeds if pixel_values is not None else None, batch, c, pad_fill)

            try:
                logits = chunked_prefill(model, prompts, pixel_values, image_position_ids, mm_token_type_ids,
                                         chunk_tokens=self.max_tokens, all_logits=all_logits, cache=cache,
                                         run_chunk=run)
            except ImageSplitError as e:  # raised before any chunk ran
                why = str(e)
            else:
                self._announce("chunked_prefills", f"a prompt of {n_real} tokens exceeds the largest bucket "
                               f"({self.max_tokens}): it ran as chunks of up to {self.max_tokens} tokens through the "
                               "graphs, each attending to the earlier chunks' keys in the KV cache (the rounding "
                               "differs from an unchunked prefill's)")
                return logits
        if why is not None:
            self._announce("eager_fallbacks", f"{why}; running the eager path")
            return model.prefill(prompts, pixel_values, image_position_ids, mm_token_type_ids,
                                 all_logits=all_logits, cache=cache)
        ids, batch = model.pack_prompts(prompts, mm_token_type_ids)  # its range check read the placeholder count too
        embeds = None
        if pixel_values is not None:
            embeds = model.embed_inputs(ids, pixel_values, image_position_ids, tower=self.tower,
                                        image_tokens=batch.image_tokens)
        elif batch.image_tokens:  # placeholders without images: the model's clear error
            model.embed_inputs(ids, None, None, image_tokens=batch.image_tokens)
        hidden = self._forward(ids, embeds, batch, cache, pad_fill)
        # The head runs outside the graph on exactly the rows asked for: a matmul's rounding can depend on its
        # row count, and the eager model computes logits for these rows only.
        return self.lm.logits(hidden if all_logits else hidden[batch.last_token_rows])

    def _forward(self, ids: Tensor, embeds: Tensor | None, batch: PackedBatch, cache: KVCache | None,
                 pad_fill: Callable[[_Buffers, int, int], None] | None) -> Tensor:
        """One forward of at most the largest bucket's tokens (a pack of prompts, or one chunk) through its bucket's
        pieces → the final-normed hidden states of the real rows: a view of the static buffer, valid until the next
        forward. ``embeds``: input embeddings with image soft tokens (None for text: piece 0 embeds the ids)."""
        n_real = batch.num_tokens
        bucket = self.bucket_for(n_real)
        pieces = self._pieces_for(bucket)  # first: capturing writes dummy inputs into the static buffers
        b = self.buf
        # Inputs: copy the real rows, then the padding (zeros/pad ids, or a test's garbage).
        b.ids[:n_real].copy_(ids)
        b.positions[:n_real].copy_(batch.positions)
        b.last_rows[: len(batch.seq_lens)].copy_(batch.last_token_rows)
        if embeds is not None:
            b.mm_embeds[:n_real].copy_(embeds)
            b.mm_mask[:n_real].copy_(ids == self.model.config.image_token_id)
        else:
            b.mm_mask[:n_real].fill_(False)
        if bucket > n_real:
            b.ids[n_real:bucket].fill_(self.lm.config.pad_token_id)
            b.positions[n_real:bucket].fill_(0)
            b.mm_mask[n_real:bucket].fill_(False)
        if pad_fill is not None:
            pad_fill(b, n_real, bucket)
        self.stats["replays"] += 1
        self.stats["real_tokens"] += n_real
        self.stats["padded_tokens"] += bucket - n_real

        ctx = self.lm.make_context(batch, cache=cache, with_rope=False)  # the graphs build their own tables
        attend = lambda i, q, k, v: self.lm.attend(i, q, k, v, ctx)  # noqa: E731
        run_decoder(self.lm, StaticStream(b, bucket), {}, attend, self.lm.fusion, pieces=pieces)
        return b.hidden[:n_real]

    def forward(self, input_ids: Tensor, pixel_values=None, image_position_ids=None, mm_token_type_ids=None):
        """Batch API like the model's: [B, T] → logits of every token [B, T, vocab]."""
        from gemma4lab.model.multimodal import batch_forward

        return batch_forward(self.prefill, input_ids, pixel_values, image_position_ids, mm_token_type_ids)

    __call__ = forward

    def padding_waste(self, token_counts: list[int]) -> list[float]:
        """Fraction of each padded forward spent on padding rows (for the notebooks' plots)."""
        out = []
        for n in token_counts:
            bk = self.bucket_for(n)
            out.append(float("nan") if bk is None else (bk - n) / bk)
        return out
