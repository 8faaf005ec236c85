"""A full CUDA graph of the one-token decode step, per batch size, over a static KV cache."""

from __future__ import annotations

import threading
import time
import warnings

import torch
from torch import Tensor

from gemma4lab.model.decoder import program_key
from gemma4lab.runtime.generation import as_prompt_list, decode_step, greedy_generate
from gemma4lab.runtime.kv_cache import KVCache
from gemma4lab.runtime.pcg import PiecewiseCudaGraphRunner


class DecodeGraphRunner:
    """A full CUDA graph of the one-token decode step for batch sizes ``1..max_batch``, over a static KV cache.

    Generation = PCG prefill (filling this runner's cache) + graph replays of the decode step. Without CUDA the
    step runs eagerly on the same static cache. Like the prefill runner it keys its graphs by ``program_key`` (a
    settings change recaptures, with a warning) and serialises concurrent calls (one cache, one set of buffers).
    """

    def __init__(self, model, *, max_batch: int = 4, max_len: int = 2048, use_graphs: bool | None = None,
                 progress: bool = True, dependent_launch: bool | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.lm = model.language_model
        self.device = model.device
        self.max_batch = max_batch
        self.max_len = max_len
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        self.progress = progress
        #: capture the kernels with programmatic dependent launch (``gemma4lab.kernels.dependent_launch``): each
        #: kernel of the step starts while the one before finishes (H200: 3.88 -> 3.67 ms a batch-1 step, the same
        #: tokens). Default: wherever the device supports it; takes effect at the next capture
        from gemma4lab.kernels import dependent_launch_setting

        self.dependent_launch = dependent_launch_setting(dependent_launch, self.device)
        self.cache = KVCache(self.lm.config, max_batch, max_len, model.dtype, self.device)
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.logits: dict[int, Tensor] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._key: tuple | None = None
        self._lock = threading.RLock()
        self.capture_s = 0.0

    @torch.no_grad()
    def capture(self, pool=None, batches: list[int] | None = None) -> float:
        """Capture the step for ``batches`` (default: every size up to ``max_batch``); returns the seconds taken.
        Under ``no_grad``, as the steps run."""
        if batches is not None and not all(isinstance(b, int) and 1 <= b <= self.max_batch for b in batches):
            raise ValueError(f"batches must be ints in [1, {self.max_batch}], got {batches!r}")
        with self._lock:
            return self._capture(pool, batches)

    def _capture(self, pool=None, batches: list[int] | None = None) -> float:
        if not self.use_graphs:
            return 0.0
        from tqdm.auto import tqdm

        from gemma4lab.kernels import dependent_launch

        self._check_program()
        self._key = program_key(self.lm)

        t0 = time.perf_counter()
        pool = pool or torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        # The warm-up steps write K/V at the static positions, which may hold a prefilled prompt: undo that.
        sizes = sorted(batches, reverse=True) if batches else range(self.max_batch, 0, -1)
        with self.cache.preserved(self.positions), dependent_launch(self.dependent_launch):
            for bsz in tqdm(sizes, desc="capturing decode graphs", disable=not self.progress):
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

    def _check_program(self) -> None:
        if self._graphs and program_key(self.lm) != self._key:
            warnings.warn(f"DecodeGraphRunner: the model's settings changed since capture ({self._key} -> "
                          f"{program_key(self.lm)}); the old graphs are dropped and captured again", stacklevel=4)
            self._graphs.clear()
            self.logits.clear()

    def step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        with self._lock:
            return self._step(tokens, positions)

    def _step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        bsz = tokens.shape[0]
        if bsz > self.max_batch:
            raise ValueError(f"batch of {bsz} exceeds the decode runner's max_batch={self.max_batch}")
        if not self.use_graphs:
            return decode_step(self.lm, tokens, positions, self.cache)
        self._check_program()
        if bsz not in self._graphs:
            self._capture()
        self.tokens[:bsz].copy_(tokens)
        self.positions[:bsz].copy_(positions)
        self._graphs[bsz].replay()
        return self.logits[bsz].clone()

    def generate(self, input_ids, max_new_tokens: int, pixel_values=None, image_position_ids=None,
                 mm_token_type_ids=None, *, prefill_runner: PiecewiseCudaGraphRunner | None = None, **kwargs):
        """Greedy generation: (PCG) prefill into the static cache, then graph-replayed decode steps."""
        with self._lock:
            return self._generate(input_ids, max_new_tokens, pixel_values, image_position_ids, mm_token_type_ids,
                                  prefill_runner, **kwargs)

    def _generate(self, input_ids, max_new_tokens, pixel_values, image_position_ids, mm_token_type_ids,
                  prefill_runner, **kwargs):
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
