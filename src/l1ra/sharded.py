"""Slot reads and writes on DTensors: FSDP2 (`fully_shard`) parameters and their optimizer state.

`l1ra.slots` calls these when a tensor is a `torch.distributed.tensor.DTensor`. Every process calls them with the same
global arguments (global slot indices, global values); each writes only the part its local shard holds, in place, into
the storage FSDP2 all-gathers from (`to_local()` is a view of FSDP2's padded shard), so neither the sharded parameter
nor the optimizer state is ever replaced.

Layouts handled: on every mesh dimension `Replicate()` or `Shard(d)` with torch.chunk-style uneven chunks (FSDP2's
default is `Shard(0)` on a 1-D mesh; HSDP is `(Replicate(), Shard(0))`). `Partial` and strided shards (FSDP + tensor
parallel) are refused with `ShardedLayoutError`.

`full(t)` is a collective (an all-gather): every process must call it, in the same order.
"""

from __future__ import annotations

from typing import Union

import torch


class ShardedLayoutError(ValueError):
    """A DTensor layout l1ra cannot write slots into; the message names the layout and what is supported."""


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor to update in place: `t` itself, or a DTensor's local shard (a view of FSDP2's storage)."""
    return t.to_local() if is_dtensor(t) else t


@torch.no_grad()
def full(t: torch.Tensor) -> torch.Tensor:
    """The full value, detached. For a DTensor this all-gathers: call it on every process."""
    if is_dtensor(t):
        return t.full_tensor().detach()
    return t.detach()


def local_ranges(t: torch.Tensor) -> list[tuple[int, int]]:
    """`[(start, stop)]` per dimension of `t`: the global index range this process's local shard holds.

    Walks the mesh dimensions in order, as DTensor does: `Shard(d)` splits the current range of dim `d` into
    `mesh.size(i)` torch.chunk-style chunks (size ceil(n / k), the last ones short or empty) and keeps this process's.
    """
    ranges = [(0, n) for n in t.shape]
    if not is_dtensor(t):
        return ranges
    from torch.distributed.tensor import Replicate, Shard

    mesh = t.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ShardedLayoutError(f"this process is not part of the DTensor's device mesh {mesh}")
    for i, placement in enumerate(t.placements):
        if type(placement) is Replicate:
            continue
        if type(placement) is not Shard:
            raise ShardedLayoutError(
                f"l1ra writes adapter slots into DTensors placed with Shard(dim) or Replicate() on each mesh "
                f"dimension (FSDP2's fully_shard default: Shard(0)); got placements {t.placements}. Use fully_shard "
                "without tensor parallelism on the LoRA layers, or DistributedDataParallel."
            )
        dim = placement.dim % t.ndim
        start, stop = ranges[dim]
        chunk = -(-(stop - start) // mesh.size(i)) if stop > start else 0
        lo = min(start + coordinate[i] * chunk, stop)
        ranges[dim] = (lo, min(lo + chunk, stop))
    shard = local(t)
    expected = tuple(b - a for a, b in ranges)
    if tuple(shard.shape) != expected:
        raise ShardedLayoutError(
            f"the local shard has shape {tuple(shard.shape)}, but placements {t.placements} on mesh {mesh} of the "
            f"global shape {tuple(t.shape)} give {expected}: l1ra supports torch.chunk-style (FSDP2) sharding only."
        )
    return ranges


def _local_slots(index: torch.Tensor, start: int, stop: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Of global slot indices `index`: the positions in `index` this shard holds, and their local indices."""
    index = torch.as_tensor(index, dtype=torch.long).reshape(-1).cpu()
    keep = ((index >= start) & (index < stop)).nonzero().reshape(-1)
    return keep.to(device), (index[keep] - start).to(device)


def _narrow_to_shard(values: torch.Tensor, ranges, skip: int) -> torch.Tensor:
    """`values` restricted to the local shard's ranges on every dimension but `skip`."""
    for d, (start, stop) in enumerate(ranges):
        if d != skip and (start, stop) != (0, values.shape[d]):
            values = values.narrow(d, start, stop - start)
    return values


def _check_index(t: torch.Tensor, dim: int, index: torch.Tensor) -> None:
    n = t.shape[dim]
    index = torch.as_tensor(index)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
        raise IndexError(f"slot indices {index.tolist()} out of range for dim {dim} of size {n}")


@torch.no_grad()
def fill_slots_(t: torch.Tensor, dim: int, index: torch.Tensor, value: Union[float, int, bool]) -> torch.Tensor:
    """In place: `t`'s slots `index` (global indices along `dim`) = `value`, each process in its own shard."""
    dim = dim % t.ndim
    _check_index(t, dim, index)
    shard = local(t)
    start, stop = local_ranges(t)[dim]
    _, idx = _local_slots(index, start, stop, shard.device)
    if idx.numel() and shard.numel():
        shard.index_fill_(dim, idx, value)
    return t


@torch.no_grad()
def write_slots_(t: torch.Tensor, dim: int, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """In place: `t`'s slots `index` (global indices along `dim`) = `values`, a full (global, unsharded) tensor of
    `t`'s shape with `len(index)` along `dim`, the same on every process. Each process copies its own part."""
    dim = dim % t.ndim
    _check_index(t, dim, index)
    values = full(values) if is_dtensor(values) else values
    n = torch.as_tensor(index).numel()
    want = list(t.shape)
    want[dim] = n
    if list(values.shape) != want:
        raise ValueError(f"values of shape {tuple(values.shape)} for {n} slots along dim {dim} of {tuple(t.shape)}")
    shard = local(t)
    ranges = local_ranges(t)
    start, stop = ranges[dim]
    keep, idx = _local_slots(index, start, stop, shard.device)
    if idx.numel() and shard.numel():
        part = _narrow_to_shard(values, ranges, dim).to(device=shard.device, dtype=shard.dtype)
        shard.index_copy_(dim, idx, part.index_select(dim, keep))
    return t


# ---------------------------------------------------------------------------------------------------------------
# Saving a sharded model: every process gathers (`full`), process 0 writes


def process_index() -> int:
    """This process's global rank (0 without an initialised process group)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0



def check_consistently_sharded(model) -> None:
    """Refuse a model with sharded (DTensor) parameters and plain trainable ones: the plain ones
    (LoRA layers added after `fully_shard`, or adapters in modules FSDP2 does not manage) get no gradient reduction,
    so the processes drift apart silently."""
    sharded = next((n for n, p in model.named_parameters() if is_dtensor(p)), None)
    plain = next((n for n, p in model.named_parameters() if p.requires_grad and not is_dtensor(p)), None)
    if sharded is None or plain is None:
        return
    raise ShardedLayoutError(
        f"trainable parameter {plain} is a plain tensor while {sharded} is sharded by FSDP2: fully_shard ran before "
        "get_l1ra_model (the LoRA layers were added to an already sharded model), or not on every module that holds "
        "adapters. Call l1ra.get_l1ra_model on the unsharded model first, then fully_shard each decoder layer and the "
        "root PeftModel (the Trainer with fsdp_config version 2 shards after it, in train())."
    )
