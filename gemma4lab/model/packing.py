"""Projections that share an input stored back to back, so that one GEMM computes them all.

q, k and v of a layer read the same normed rows; so do the dense MLP's gate and up. At a short prompt each of these
GEMMs streams 6–23 MB of weights and pays a fixed ~5 µs of ramp and tail on top (H200, cuBLAS at 93 rows: q 10.3 µs,
k and v 8.1 µs each — 26.5 µs for 46 MB, against 16.2 µs for one GEMM over the three weights stacked;
``results/runs/dense_sweep_h200_64f1e27.json``). Stacking them costs no memory when the weights already *are* one
buffer: :func:`pack_linears` moves the modules' weights into one ``[ΣN, K]`` tensor and leaves each ``weight`` a
row-block view of it, so checkpoints, ``state_dict`` and every caller still see separate parameters, and
:func:`packed_weight` hands the GEMM the whole block.

A module's conversions (``.to``, ``.cuda``, ``to_empty``) allocate each parameter anew, which undoes the packing;
the modules that own packed projections call :func:`pack_linears` again in ``_apply`` (see ``PackedProjections``).
Where the weights are not back to back (a user replaced one, or ``load_state_dict(assign=True)``), the model runs
one GEMM per projection: the same result, only slower.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def packed_weight(weights: Sequence[Tensor]) -> Tensor | None:
    """``[w0; w1; …]`` as one ``[ΣN, K]`` view when the weights lie back to back (what :func:`pack_linears`
    leaves); None otherwise. Only where no gradient is wanted: the view is taken through the first weight's storage,
    so autograd would credit every row block to ``w0``."""
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        return None
    return _stacked_view(weights)


def _stacked_view(weights: Sequence[Tensor]) -> Tensor | None:
    """The layout test: two or more 2-D weights of one K, dtype and device, contiguous, each starting where the one
    before ends in one storage → the detached ``[ΣN, K]`` view over them; else None."""
    if len(weights) < 2:
        return None
    w0 = weights[0]
    k = w0.shape[-1] if w0.dim() == 2 else -1
    end = w0.storage_offset()
    for w in weights:
        if (w.dim() != 2 or w.shape[1] != k or not w.is_contiguous() or w.dtype != w0.dtype or w.device != w0.device
                or w.untyped_storage().data_ptr() != w0.untyped_storage().data_ptr() or w.storage_offset() != end):
            return None
        end += w.numel()
    rows = sum(w.shape[0] for w in weights)
    return w0.detach().as_strided((rows, k), (k, 1), w0.storage_offset())


def pack_linears(linears: Sequence[nn.Linear]) -> bool:
    """Move the weights of bias-free linears that share ``in_features``, dtype and device into one buffer, each
    ``weight`` becoming a row-block view of it (values and ``requires_grad`` kept). Returns whether they are packed
    now; linears that cannot share a buffer (biases, different shapes or dtypes) are left as they are."""
    linears = [m for m in linears if m is not None]
    if len(linears) < 2 or any(not isinstance(m, nn.Linear) or m.bias is not None for m in linears):
        return False
    ws = [m.weight for m in linears]
    if any(w.dim() != 2 or w.shape[1] != ws[0].shape[1] or w.dtype != ws[0].dtype or w.device != ws[0].device
           for w in ws):
        return False
    if _stacked_view(ws) is not None:  # already packed
        return True
    buf = torch.empty((sum(w.shape[0] for w in ws), ws[0].shape[1]), dtype=ws[0].dtype, device=ws[0].device)
    start = 0
    with torch.no_grad():
        for m, w in zip(linears, ws):
            block = buf[start:start + w.shape[0]]
            if w.device.type != "meta":
                block.copy_(w)
            m.weight = nn.Parameter(block, requires_grad=w.requires_grad)
            start += w.shape[0]
    return True


class PackedProjections(nn.Module):
    """Mixin for a module whose projections that share an input are stored packed: :meth:`packed_groups` names
    them; they are packed at construction (call :meth:`pack` at the end of ``__init__``) and again after every
    conversion, which allocates each parameter anew."""

    def packed_groups(self) -> list[list[nn.Linear]]:
        raise NotImplementedError

    def pack(self) -> None:
        for group in self.packed_groups():
            pack_linears(group)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's private signature
        super()._apply(fn, recurse)
        self.pack()
        return self
