"""Slot-level reads and writes of adapter tensors (parameters and optimizer state), in place.

A slot is one index along a tensor's rank axis (`lora_A`: dim 0, `lora_B`: dim 1, gate: dim 0). Every slot-level
access in l1ra goes through these five functions, so that sharded tensors (`torch.distributed.tensor.DTensor`, as
FSDP2 makes them) can be handled in one place: for a DTensor each function delegates to the same-named function of
`l1ra.sharded` (imported only then). For plain tensors they are the obvious tensor operations.
"""

from __future__ import annotations

import torch


def is_dtensor(t) -> bool:
    """Whether `t` is a `torch.distributed.tensor.DTensor` (a parameter's data included)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor) or isinstance(getattr(t, "data", None), DTensor)


def _sharded():
    from . import sharded  # helper module for DTensors; plain tensors never import it

    return sharded


def local(t: torch.Tensor) -> torch.Tensor:
    """The storage to update in place: `t` itself, or a DTensor's local shard."""
    if is_dtensor(t):
        return _sharded().local(t)
    return t


def full(t: torch.Tensor) -> torch.Tensor:
    """The full value, detached (for a DTensor a collective that every process must call)."""
    if is_dtensor(t):
        return _sharded().full(t)
    return t.detach()


def _index(index, device) -> torch.Tensor:
    return torch.as_tensor(index, dtype=torch.long).to(device)


@torch.no_grad()
def fill_slots_(t: torch.Tensor, dim: int, index, value: float) -> torch.Tensor:
    """In place: the slots `index` (global indices along `dim`) of `t` are set to `value`."""
    if is_dtensor(t):
        return _sharded().fill_slots_(t, dim, index, value)
    idx = _index(index, t.device)
    if idx.numel():
        t.index_fill_(dim, idx, value)
    return t


@torch.no_grad()
def write_slots_(t: torch.Tensor, dim: int, index, values: torch.Tensor) -> torch.Tensor:
    """In place: the slots `index` of `t` along `dim` are set to `values` (t's shape with len(index) along dim)."""
    if is_dtensor(t):
        return _sharded().write_slots_(t, dim, index, values)
    idx = _index(index, t.device)
    if idx.numel():
        t.index_copy_(dim, idx, values.to(device=t.device, dtype=t.dtype))
    return t
