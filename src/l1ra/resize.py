"""Apply a reallocation plan to one LoRA layer: new A, B and gate parameters with the surviving ranks first."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peft.tuners.lora import LoraLayer

from .allocator import AdapterPlan


@dataclass
class ParamChange:
    """A parameter replaced by a resized one; `rank_dim` is the axis that holds the ranks."""

    old: nn.Parameter
    new: nn.Parameter
    rank_dim: int
    keep: torch.Tensor  # long indices of the surviving ranks along rank_dim
    n_new: int


def new_lora_A_rows(n: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """Rows for new ranks, drawn like PEFT's default init (kaiming_uniform, a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in)))."""
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(n, in_features, generator=generator, dtype=torch.float32) * 2 - 1) * bound


def _resized(param: nn.Parameter, rank_dim: int, keep: torch.Tensor, fill: torch.Tensor) -> nn.Parameter:
    data = torch.cat([param.detach().index_select(rank_dim, keep.to(param.device)), fill], dim=rank_dim)
    return nn.Parameter(data.contiguous(), requires_grad=param.requires_grad)


@torch.no_grad()
def resize_adapter(
    layer: LoraLayer, adapter: str, plan: AdapterPlan, new_rows: torch.Tensor
) -> list[ParamChange]:
    """Keep `plan.keep` ranks, append `plan.n_new` ranks with gate 1, A = `new_rows`, B = 0.

    Output is unchanged when the dropped ranks had gate 0, since new ranks contribute B = 0. The module objects stay
    the same (so the gate hook stays registered); their weight parameters are replaced.
    """
    lora_A, lora_B, gates = layer.lora_A[adapter], layer.lora_B[adapter], layer.l1ra_gate
    keep = torch.tensor(plan.keep, dtype=torch.long)
    a, b, g = lora_A.weight, lora_B.weight, gates[adapter]
    new_a = _resized(a, 0, keep, new_rows.to(device=a.device, dtype=a.dtype))
    new_b = _resized(b, 1, keep, b.new_zeros(b.shape[0], plan.n_new))
    new_g = _resized(g, 0, keep, g.new_ones(plan.n_new))
    lora_A.weight, lora_A.out_features = new_a, plan.rank
    lora_B.weight, lora_B.in_features = new_b, plan.rank
    gates[adapter] = new_g
    layer.r[adapter] = plan.rank
    return [
        ParamChange(a, new_a, 0, keep, plan.n_new),
        ParamChange(b, new_b, 1, keep, plan.n_new),
        ParamChange(g, new_g, 0, keep, plan.n_new),
    ]


@torch.no_grad()
def set_adapter_rank(layer: LoraLayer, adapter: str, rank: int) -> None:
    """Give the adapter `rank` ranks (for loading a checkpoint); the values are overwritten by the caller."""
    old = layer.r[adapter]
    if old == rank:
        return
    keep = AdapterPlan(keep=tuple(range(min(old, rank))), n_new=max(0, rank - old))
    rows = torch.zeros(keep.n_new, layer.lora_A[adapter].in_features)
    resize_adapter(layer, adapter, keep, rows)
