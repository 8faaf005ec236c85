"""The vision tower as one CUDA graph per image shape.

An image prompt's tower is launch-bound like a short text prefill: ~93 kernels per encoder layer, ~2600 for one
image, against a few milliseconds of GPU work. The processor pads every image to the same patch budget, so the
tower's shapes depend only on ``[N, P]`` (images × patches per image): one graph per ``[N, P]`` serves every image
set of that count. What cannot be in a graph stays out, eagerly, around the replay:

* **before**: the RoPE frequencies (computed on the CPU, as the reference does, and copied to the device), and the
  copy of the pixels and positions into the graph's static inputs;
* **in the graph**: patch embedding, every encoder layer, pooling → pooled features [N, P/k², D] and the mask of
  slots holding a soft token (``VisionTower.pooled``: no host synchronisation);
* **after**: ``pooled[valid]`` (its length is data), standardisation and the cast (``VisionTower.finish``).

The same ops in the same order as the eager tower, so the soft tokens are bit-identical to it (a GPU test checks).
A graph holds the tensors and kernels it was captured with: the graphs remember the address and dtype of every
parameter and buffer of the tower and the encoder's fused kernels, and when any changes (``model.to(...)``, a
replaced parameter, ``set_fusion``) they are dropped and captured again, never replayed stale; a graph is keyed by
``[N, P]`` and the inputs' dtypes. Without CUDA the tower runs eagerly (same code, no graph), so CPU tests exercise
the split.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from gemma4lab.model.vision import VisionTower

#: Bumped by every parameter, buffer or submodule registered anywhere in the process (torch's global registration
#: hooks, which fire on ``module.weight = Parameter(...)``, ``layers[i] = new_layer``, ``register_buffer``): the cue
#: for :class:`TowerGraphs` to walk its tower's modules again. Between registrations the tower holds the same tensor
#: objects, so the staleness key reads their addresses and dtypes from a cached list (a cast through ``.to()``
#: swaps a tensor's storage in place: its address changes and the key sees it).
_REGISTRATIONS = [0]


def _registered(*_args: object) -> None:  # returning None keeps what was registered
    _REGISTRATIONS[0] += 1


for _register_hook in (torch.nn.modules.module.register_module_parameter_registration_hook,
                       torch.nn.modules.module.register_module_buffer_registration_hook,
                       torch.nn.modules.module.register_module_module_registration_hook):
    _register_hook(_registered)


def module_tensors(root: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer under ``root``, read straight from each module's ``_parameters`` / ``_buffers``:
    the same tensors as ``parameters()`` + ``buffers()`` (a shared one repeats, which changes nothing for a
    comparison), at a fifth of their cost — their traversal builds every name (355 tensors for the 26B-A4B tower:
    0.75 ms through ``parameters()`` on a CI core)."""
    out, stack = [], [root]
    while stack:
        m = stack.pop()
        out += [t for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
        stack.extend(c for c in m._modules.values() if c is not None)
    return out


class TowerGraphs:
    """``tower(pixel_values, image_position_ids)`` with each ``[N, P]`` captured once and replayed after (the
    signature of ``VisionTower.forward``; pass it as ``model.image_features(..., tower=graphs)``).
    ``max_shapes`` bounds how many shapes are kept (each holds its static inputs and a graph); the oldest goes
    first. ``stats`` counts captures and replays."""

    def __init__(self, tower: VisionTower, *, use_graphs: bool | None = None, max_shapes: int = 8) -> None:
        if not isinstance(tower, VisionTower):
            raise TypeError(f"TowerGraphs takes a gemma4lab VisionTower, got {type(tower).__name__}")
        if max_shapes < 1:
            raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
        self.tower = tower
        device = tower.patch_embedder.input_proj.weight.device
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs and device.type != "cuda":
            raise ValueError("use_graphs=True needs the vision tower on a CUDA device")
        self.max_shapes = max_shapes
        self.stats = {"captures": 0, "replays": 0, "eager": 0, "dropped": 0}
        #: (images, patches, pixel dtype, position dtype) -> (graph, static inputs, inv_freq, pooled, valid)
        self._graphs: dict[tuple, tuple] = {}
        self._weights: tuple | None = None  # what the graphs were captured over (see _weights_key)
        self._tensors: tuple[int, list[Tensor]] | None = None  # (registration count, the tower's tensors) cached
        self._pool = None

    def _weights_key(self) -> tuple:
        """What the graphs were captured over: every tensor they read by address (a parameter or buffer replaced,
        moved or cast changes it; a ``load_state_dict`` copies in place and keeps it: the graphs then read the new
        values, as they should) and the fused kernels the encoder runs (``set_fusion`` changes the program). The
        tensors are walked again only after a registration somewhere (:data:`_REGISTRATIONS`): 355 tensors for the
        26B-A4B tower, whose walk sat in the host gap before every replay (0.41 ms on a CI core)."""
        if self._tensors is None or self._tensors[0] != _REGISTRATIONS[0]:
            self._tensors = (_REGISTRATIONS[0], module_tensors(self.tower))
        return (self.tower.encoder.fusion, *[(t.data_ptr(), t.dtype) for t in self._tensors[1]])

    def reset(self) -> None:
        """Drop every captured graph (their memory returns to the caching allocator)."""
        self.stats["dropped"] += len(self._graphs)
        self._graphs.clear()
        self._pool = None

    @torch.no_grad()
    def __call__(self, pixel_values: Tensor, image_position_ids: Tensor) -> Tensor:
        tower = self.tower
        if not self.use_graphs:
            self.stats["eager"] += 1
            return tower(pixel_values, image_position_ids)
        tower.check_shapes(pixel_values, image_position_ids)
        weights = self._weights_key()
        if weights != self._weights:
            if self._graphs:
                warnings.warn("TowerGraphs: the tower's weights (replaced, moved or cast) or its fused kernels changed "
                              "since capture; the old graphs are dropped and captured again", stacklevel=3)
                self.reset()
            self._weights = weights
        key = (*pixel_values.shape[:2], pixel_values.dtype, image_position_ids.dtype)
        if key not in self._graphs:
            if len(self._graphs) >= self.max_shapes:
                self._graphs.pop(next(iter(self._graphs)))
                self.stats["dropped"] += 1
            self._graphs[key] = self._capture(pixel_values, image_position_ids)
        graph, pv, ip, inv_freq, pooled, valid = self._graphs[key]
        pv.copy_(pixel_values)
        ip.copy_(image_position_ids)
        graph.replay()
        self.stats["replays"] += 1
        return tower.finish(pooled, valid)

    def _capture(self, pixel_values: Tensor, image_position_ids: Tensor) -> tuple:
        tower = self.tower
        device = tower.patch_embedder.input_proj.weight.device
        pv = torch.empty(pixel_values.shape, dtype=pixel_values.dtype, device=device)
        ip = torch.empty(image_position_ids.shape, dtype=image_position_ids.dtype, device=device)
        pv.copy_(pixel_values)
        ip.copy_(image_position_ids)
        inv_freq = tower.encoder.inv_freq(device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up on the capture stream (cuBLAS handles, SDPA's kernel choice)
            tower.pooled(pv, ip, inv_freq)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                pooled, valid = tower.pooled(pv, ip, inv_freq)
        except Exception as e:
            raise RuntimeError(f"capturing the vision tower for {tuple(pixel_values.shape[:2])} [images, patches] "
                               f"failed: something in it synchronises with the host ({type(e).__name__}: {e})"[:600]
                               ) from e
        self.stats["captures"] += 1
        return graph, pv, ip, inv_freq, pooled, valid
