"""Piecewise CUDA graphs for prefill, and a full CUDA graph for the one-token decode step.

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
* **No silent fallback.** Above the largest bucket (or with more prompts than the runner holds) the eager path
  runs and a warning says so, once; ``runner.stats`` counts every fallback.
* **Images replay the same graphs.** The vision tower runs outside; its soft tokens go into a static
  input-embeddings buffer that piece 0 selects with a mask, so text and image prompts share every graph.
* **Same code on CPU.** Without CUDA the runner runs the identical split and padding logic eagerly and says
  that no graphs were captured, so CI tests the logic.
"""

from __future__ import annotations

import bisect
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .generation import KVCache, as_prompt_list, decode_step, greedy_generate


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
        self.stats = {"replays": 0, "eager_fallbacks": 0, "padded_tokens": 0, "real_tokens": 0}
        self._warned = False
        self._graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self._pool = None
        self._check_memory()
        self.buf = self._allocate()
        self.report = CaptureReport(graphs=False, buckets=self.buckets, device=str(self.device),
                                    static_buffer_bytes=self.buf.nbytes(),
                                    pieces_per_bucket=len(self.lm.layers) + 1)

    # ---- buffers -------------------------------------------------------------------------------------------------
    def _buffer_elements(self) -> int:
        """Elements of the static buffers ``_allocate`` will create (checked against free memory first)."""
        cfg, n = self.lm.config, self.max_tokens
        per_row = 3 * cfg.hidden_size  # h, x, hidden
        for sliding in (True, False):
            i = next((j for j in range(cfg.num_hidden_layers) if cfg.is_sliding(j) == sliding), None)
            if i is None:
                continue
            d = cfg.layer_head_dim(i)
            per_row += (2 * cfg.num_attention_heads + 2 * cfg.layer_kv_heads(i)) * d + 2 * d
        return n * per_row + n * cfg.hidden_size

    def _check_memory(self) -> None:
        est = self._buffer_elements() * torch.finfo(self.model.dtype).bits // 8
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

    def _allocate(self) -> _Buffers:
        cfg, n, dev, dt = self.lm.config, self.max_tokens, self.device, self.model.dtype
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
        """Closures over ``[:n]`` views; each reads and writes only static buffers."""
        lm, b, fusion = self.lm, self.buf, self.lm.fusion
        layers = lm.layers

        def store_qkv(i: int, q: Tensor, k: Tensor, v: Tensor) -> None:
            s = layers[i].self_attn.sliding
            b.q[s][:n].copy_(q)
            b.k[s][:n].copy_(k)
            b.v[s][:n].copy_(v)

        def piece0() -> None:
            e = lm.embed(b.ids[:n])
            e = torch.where(b.mm_mask[:n, None], b.mm_embeds[:n], e)
            b.h[:n].copy_(e)
            for s, (c, si) in lm.rope(b.positions[:n]).items():
                b.cos[s][:n].copy_(c)
                b.sin[s][:n].copy_(si)
            s0 = layers[0].self_attn.sliding
            store_qkv(0, *layers[0].pre_attention(b.h[:n], None, b.cos[s0][:n], b.sin[s0][:n], fusion))

        def middle(i: int) -> Callable[[], None]:
            def piece() -> None:
                prev = layers[i - 1]
                h, x = prev.post_attention(b.o[prev.self_attn.sliding][:n], b.h[:n], lm.next_norm_weight(i - 1),
                                           fusion)
                b.h[:n].copy_(h)
                if x is not None:
                    b.x[:n].copy_(x)
                s = layers[i].self_attn.sliding
                xin = b.x[:n] if x is not None else None
                store_qkv(i, *layers[i].pre_attention(b.h[:n], xin, b.cos[s][:n], b.sin[s][:n], fusion))

            return piece

        def last() -> None:
            prev = layers[-1]
            h, x = prev.post_attention(b.o[prev.self_attn.sliding][:n], b.h[:n], lm.next_norm_weight(len(layers) - 1),
                                       fusion)
            b.hidden[:n].copy_(lm.final_norm(h, x))

        return [piece0] + [middle(i) for i in range(1, len(layers))] + [last]

    # ---- capture -------------------------------------------------------------------------------------------------
    def capture(self) -> CaptureReport:
        """Record every bucket's pieces (largest first, one shared pool). A no-op report without CUDA."""
        if not self.use_graphs:
            self.report.graphs = False
            return self.report
        from tqdm.auto import tqdm

        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # so that the reserved-memory delta is the graph pool alone
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
            self._graphs[n] = graphs
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        self.report.graphs = True
        self.report.capture_s = time.perf_counter() - t0
        self.report.graph_pool_bytes = torch.cuda.memory_reserved(self.device) - before
        return self.report

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

    def _fallback(self, reason: str) -> None:
        self.stats["eager_fallbacks"] += 1
        if not self._warned:
            warnings.warn(f"PiecewiseCudaGraphRunner: {reason}; running the eager path (said once; "
                          "runner.stats['eager_fallbacks'] counts every time)", stacklevel=3)
            self._warned = True

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
        """Same contract as ``model.prefill``. ``pad_fill(buffers, n_real, bucket)`` lets tests write garbage."""
        model = self.model
        n_real = sum(int(p.numel()) for p in prompts)
        bucket = self.bucket_for(n_real)
        if bucket is None or len(prompts) > self.max_prompts:
            why = (f"{n_real} tokens exceed the largest bucket ({self.max_tokens})" if bucket is None
                   else f"{len(prompts)} prompts exceed max_prompts={self.max_prompts}")
            self._fallback(why)
            return model.prefill(prompts, pixel_values, image_position_ids, mm_token_type_ids,
                                 all_logits=all_logits, cache=cache)
        if self.use_graphs and bucket not in self._graphs:
            self.capture()

        ids, batch = model.pack_prompts(prompts, mm_token_type_ids)
        b = self.buf
        # Inputs: copy the real rows, then the padding (zeros/pad ids, or a test's garbage).
        b.ids[:n_real].copy_(ids)
        b.positions[:n_real].copy_(batch.positions)
        b.last_rows[: len(prompts)].copy_(batch.last_token_rows)
        if pixel_values is not None:
            b.mm_embeds[:n_real].copy_(model.embed_inputs(ids, pixel_values, image_position_ids))
            b.mm_mask[:n_real].copy_(ids == model.config.image_token_id)
        else:
            if bool((ids == model.config.image_token_id).any()):
                model.embed_inputs(ids, None, None)  # raises the model's clear error about missing images
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

        ctx = self.lm.make_context(batch, cache=cache)
        pieces = self._graphs[bucket] if self.use_graphs else self._pieces(bucket)
        layers = self.lm.layers
        for i, piece in enumerate(pieces):
            piece.replay() if self.use_graphs else piece()
            if i < len(layers):
                s = layers[i].self_attn.sliding
                o = self.lm.attend(i, b.q[s][:bucket], b.k[s][:bucket], b.v[s][:bucket], ctx)
                b.o[s][:n_real].copy_(o)
        # The head runs outside the graph on exactly the rows asked for: a matmul's rounding can depend on its
        # row count, and the eager model computes logits for these rows only.
        rows = b.hidden[:n_real] if all_logits else b.hidden[batch.last_token_rows]
        return self.lm.logits(rows)

    def forward(self, input_ids: Tensor, pixel_values=None, image_position_ids=None, mm_token_type_ids=None):
        """Batch API like the model's: [B, T] → logits of every token [B, T, vocab]."""
        from .model import batch_forward

        return batch_forward(self.prefill, input_ids, pixel_values, image_position_ids, mm_token_type_ids)

    __call__ = forward

    def padding_waste(self, token_counts: list[int]) -> list[float]:
        """Fraction of each padded forward spent on padding rows (for the notebooks' plots)."""
        out = []
        for n in token_counts:
            bk = self.bucket_for(n)
            out.append(float("nan") if bk is None else (bk - n) / bk)
        return out


class DecodeGraphRunner:
    """A full CUDA graph of the one-token decode step for batch sizes ``1..max_batch``, over a static KV cache.

    Generation = PCG prefill (filling this runner's cache) + graph replays of the decode step. Without CUDA the
    step runs eagerly on the same static cache.
    """

    def __init__(self, model, *, max_batch: int = 4, max_len: int = 2048, use_graphs: bool | None = None,
                 progress: bool = True) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.lm = model.language_model
        self.device = model.device
        self.max_batch = max_batch
        self.max_len = max_len
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        self.progress = progress
        self.cache = KVCache(self.lm.config, max_batch, max_len, model.dtype, self.device)
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.logits: dict[int, Tensor] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_s = 0.0

    def capture(self, pool=None) -> float:
        if not self.use_graphs:
            return 0.0
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        pool = pool or torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        # The warm-up steps write K/V at the static positions, which may hold a prefilled prompt: undo that.
        with self.cache.preserved(self.positions):
            for bsz in tqdm(range(self.max_batch, 0, -1), desc="capturing decode graphs", disable=not self.progress):
                tok, pos = self.tokens[:bsz], self.positions[:bsz]
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    decode_step(self.lm, tok, pos, self.cache)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=stream):
                    self.logits[bsz] = decode_step(self.lm, tok, pos, self.cache)
                self._graphs[bsz] = g
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - t0
        return self.capture_s

    def step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        bsz = tokens.shape[0]
        if bsz > self.max_batch:
            raise ValueError(f"batch of {bsz} exceeds the decode runner's max_batch={self.max_batch}")
        if not self.use_graphs:
            return decode_step(self.lm, tokens, positions, self.cache)
        if bsz not in self._graphs:
            self.capture()
        self.tokens[:bsz].copy_(tokens)
        self.positions[:bsz].copy_(positions)
        self._graphs[bsz].replay()
        return self.logits[bsz].clone()

    def generate(self, input_ids, max_new_tokens: int, pixel_values=None, image_position_ids=None,
                 mm_token_type_ids=None, *, prefill_runner: PiecewiseCudaGraphRunner | None = None, **kwargs):
        """Greedy generation: (PCG) prefill into the static cache, then graph-replayed decode steps."""
        prompts = as_prompt_list(input_ids)
        longest = max(int(p.numel()) for p in prompts)
        if longest + max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceed the decode runner's "
                             f"max_len={self.max_len}")
        if len(prompts) > self.max_batch:
            raise ValueError(f"{len(prompts)} prompts exceed the decode runner's max_batch={self.max_batch}")
        prefill = prefill_runner.prefill if prefill_runner is not None else self.model.prefill
        return greedy_generate(self.model, input_ids, max_new_tokens, pixel_values, image_position_ids,
                               mm_token_type_ids, step_fn=self.step, cache=self.cache, prefill_fn=prefill, **kwargs)
