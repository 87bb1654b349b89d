"""Optimizer groups for L1RA and the remapping of optimizer state when parameters are resized."""

from __future__ import annotations

import warnings
from typing import Iterable, Optional

import torch
from torch import nn

from .resize import ParamChange

ADAPTER_GROUP, NO_DECAY_GROUP, GATE_GROUP = "l1ra_adapters", "l1ra_adapters_no_decay", "l1ra_gates"


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under wrappers such as Accelerate's `AcceleratedOptimizer`."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def param_groups(model: nn.Module, lr: float, weight_decay: float, gate_lr: float, gates: Iterable[nn.Parameter]):
    """Adapters (matrices with weight decay, vectors without) at `lr`; gates at `gate_lr`, no weight decay."""
    gate_ids = {id(g) for g in gates}
    decay, no_decay, gate_params = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in gate_ids:
            gate_params.append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": ADAPTER_GROUP},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": NO_DECAY_GROUP},
        {"params": gate_params, "lr": gate_lr, "weight_decay": 0.0, "name": GATE_GROUP},
    ]
    groups = [g for g in groups if g["params"]]
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_trainable, "every trainable parameter in exactly one group"
    return groups


def group_lr_of(optimizer, params: list[nn.Parameter]) -> list[Optional[float]]:
    """Current learning rate of the group holding each parameter (None if the optimizer does not hold it)."""
    lr_by_id = {}
    for group in unwrap_optimizer(optimizer).param_groups:
        for p in group["params"]:
            lr_by_id[id(p)] = group["lr"]
    return [lr_by_id.get(id(p)) for p in params]


# Second-moment-like state (Adam's v, AMSGrad's max v, Adafactor's vector v): a new rank's slot is seeded with the mean of the surviving
# ranks' values. Adam's bias correction belongs to the whole tensor (one `step`), so after a long run a zero v in a new
# slot is never corrected: its first updates would be ~(1-beta1)/sqrt(1-beta2) = 3.2x a fresh Adam's. With the
# survivors' v the new slot is normalised like its peers and its first steps are gentler than a fresh Adam's.
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq", "variance")  # "variance": Adafactor's unfactored (vector) state


def _resize_state_tensor(key, value, change: ParamChange):
    if not isinstance(value, torch.Tensor):
        return value
    if value.ndim == 0:
        return value.clone()  # per-parameter step counter: never share one tensor between parameters
    if value.shape != change.old.shape:
        raise LookupError  # a layout we do not know how to slice (factored or quantized state)
    kept = value.index_select(change.rank_dim, change.keep.to(value.device))
    fill_shape = list(value.shape)
    fill_shape[change.rank_dim] = change.n_new
    if key in SECOND_MOMENTS and change.n_new and kept.shape[change.rank_dim] > 0:
        fill = kept.mean(dim=change.rank_dim, keepdim=True).expand(fill_shape)
    else:
        fill = value.new_zeros(fill_shape)  # first moments, momentum, Adagrad's sum: what a fresh optimizer holds
    return torch.cat([kept, fill], dim=change.rank_dim)


def remap_optimizer(optimizer, changes: list[ParamChange]) -> int:
    """Point the optimizer at the resized parameters, slicing their state along the rank axis.

    Surviving ranks keep their moments exactly and step counters are kept: no restart. New ranks start with zero
    first moments (momentum, Adagrad's sum: as a fresh optimizer) and second moments (`exp_avg_sq`) seeded with the
    surviving ranks' mean, so that Adam's mature bias correction does not blow up their first steps. State in an
    unknown layout (e.g. Adafactor's factored moments) is dropped for that parameter only, with a warning, and
    rebuilt by the optimizer on its next step. Returns how many parameters were remapped.
    """
    opt = unwrap_optimizer(optimizer)
    where = {id(p): (gi, pi) for gi, g in enumerate(opt.param_groups) for pi, p in enumerate(g["params"])}
    remapped = 0
    for change in changes:
        loc = where.get(id(change.old))
        if loc is None:
            continue
        gi, pi = loc
        opt.param_groups[gi]["params"][pi] = change.new  # same index: state_dict order stays stable
        state = opt.state.pop(change.old, None)
        if state:
            try:
                opt.state[change.new] = {k: _resize_state_tensor(k, v, change) for k, v in state.items()}
            except LookupError:
                warnings.warn(
                    f"l1ra: {type(opt).__name__} keeps optimizer state in a layout l1ra cannot slice by rank; the "
                    "state of resized adapters is reset (other parameters keep theirs).",
                    stacklevel=3,
                )
        remapped += 1
    return remapped
