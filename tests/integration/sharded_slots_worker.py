"""Launched by tests/integration/test_sharded.py under `torch.distributed.run --nproc_per_node N` (gloo, CPU): slot
writes through `l1ra.sharded` into FSDP2 (`fully_shard`) parameters, their AdamW state and other DTensor layouts,
each checked against the same operations on plain tensors. Writes `<out>/slots-rank<R>.json` with the checks'
results."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

torch.set_num_threads(1)

from l1ra import sharded  # noqa: E402

C, IN, OUT = 5, 6, 7  # capacity 5: uneven over 2 processes (chunks 3 and 2)


class Adapter(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(torch.randn(C, IN, generator=g))
        self.b = nn.Parameter(torch.randn(OUT, C, generator=g))
        self.gate = nn.Parameter(torch.rand(C, generator=g))
        self.tiny = nn.Parameter(torch.ones(1))  # one row over 2 processes: rank 1's shard is empty

    def forward(self, x):
        return ((x @ self.a.T) * self.gate) @ self.b.T * self.tiny


def writes(step: int, positive: bool = False):
    """(name, dim, index, kind, value) writes: fills and full-slot writes along both dims of every parameter
    (`positive`: values a second moment can hold)."""
    g = torch.Generator().manual_seed(100 + step)
    items = [
        ("a", 0, torch.tensor([4, 0]), "write", torch.randn(2, IN, generator=g)),
        ("a", 1, torch.tensor([5, 1, 2]), "fill", 0.5),
        ("b", 1, torch.tensor([1, 3]), "write", torch.randn(OUT, 2, generator=g)),
        ("b", 1, torch.tensor([4]), "fill", 0.0),
        ("b", 0, torch.tensor([6, 2]), "write", torch.randn(2, C, generator=g)),
        ("gate", 0, torch.tensor([2, 3, 4]), "fill", 1.0),
        ("gate", 0, torch.tensor([0]), "write", torch.tensor([0.25])),
        ("tiny", 0, torch.tensor([0]), "fill", 2.0),
    ]
    return [(n, d, i, k, v.abs() if positive and k == "write" else v) for n, d, i, k, v in items]


def apply(get, items) -> None:
    for name, dim, index, kind, value in items:
        t = get(name)
        if kind == "fill":
            sharded.fill_slots_(t, dim, index, value)
        else:
            sharded.write_slots_(t, dim, index, value)


def reference(get, items) -> None:
    """The same writes with torch's own ops on plain full tensors."""
    with torch.no_grad():
        for name, dim, index, kind, value in items:
            t = get(name)
            if kind == "fill":
                t.index_fill_(dim, index, value)
            else:
                t.index_copy_(dim, index, value)


def identity(model, opt):
    """Objects and storage that must never change: parameters, their local shards, optimizer state tensors."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = (id(p), sharded.local(p).data_ptr())
        for key, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.ndim:
                out[f"{name}.{key}"] = (id(v), sharded.local(v).data_ptr())
    return out


def main() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    out = Path(sys.argv[1])
    result = {"rank": rank}

    model, plain = Adapter(), Adapter()
    fully_shard(model, mesh=mesh)
    result["placements"] = {n: str(p.placements) for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)
    ref_opt = torch.optim.AdamW(plain.parameters(), lr=0.1, weight_decay=0.01)
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(5))  # same batch on every process

    def train_step():
        model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        plain(x).pow(2).sum().backward()
        ref_opt.step()
        ref_opt.zero_grad()

    train_step()
    before = identity(model, opt)
    params, ref_params = dict(model.named_parameters()), dict(plain.named_parameters())
    # 1. Parameters: every process's full() equals the reference after the writes.
    apply(params.__getitem__, writes(1))
    reference(ref_params.__getitem__, writes(1))
    result["param_errors"] = {n: float((sharded.full(p) - ref_params[n].detach()).abs().max()) for n, p in params.items()}
    # 2. Optimizer state (DTensors with the parameters' placements): reset / overwrite slots.
    for key in ("exp_avg", "exp_avg_sq"):
        for pick in (params, ref_params):
            states = {n: (opt if pick is params else ref_opt).state[p][key] for n, p in pick.items()}
            (apply if pick is params else reference)(states.__getitem__, writes(2 if key == "exp_avg" else 3, positive=key == "exp_avg_sq"))
    result["state_is_dtensor"] = all(isinstance(opt.state[p]["exp_avg"], DTensor) for p in params.values())
    result["state_errors"] = {
        f"{n}.{key}": float((sharded.full(opt.state[p][key]) - ref_opt.state[ref_params[n]][key]).abs().max())
        for n, p in params.items() for key in ("exp_avg", "exp_avg_sq")
    }
    # 3. A forward, backward and AdamW step after the writes uses the written values (parameters and moments).
    train_step()
    train_step()
    result["after_step_errors"] = {n: float((sharded.full(p) - ref_params[n].detach()).abs().max()) for n, p in params.items()}
    result["same_objects"] = identity(model, opt) == before
    # 4. Other layouts: Replicate, Shard(1); Partial is refused.
    full_value = torch.arange(C * IN, dtype=torch.float32).reshape(C, IN)
    for label, placement in (("replicate", Replicate()), ("shard1", Shard(1))):
        dt = distribute_tensor(full_value.clone(), mesh, [placement])
        ptr = dt.to_local().data_ptr()
        ref = full_value.clone()
        items = [("t", 1, torch.tensor([0, 5]), "write", -torch.ones(C, 2)), ("t", 0, torch.tensor([3]), "fill", 9.0)]
        apply(lambda _: dt, items)
        reference(lambda _: ref, items)
        result[f"{label}_error"] = float((sharded.full(dt) - ref).abs().max())
        result[f"{label}_same_storage"] = dt.to_local().data_ptr() == ptr
    partial = DTensor.from_local(torch.ones(C), mesh, [Partial()])
    try:
        sharded.fill_slots_(partial, 0, torch.tensor([0]), 0.0)
        result["partial_refused"] = ""
    except sharded.ShardedLayoutError as err:
        result["partial_refused"] = str(err)
    (out / f"slots-rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
