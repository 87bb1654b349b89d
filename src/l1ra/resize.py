"""Fixed-capacity adapters: grow each adapter once to its capacity, then prune and revive slots in place.

After `grow_to_capacity_` (called by `get_l1ra_model`, before any optimizer or wrapper exists) an adapter's `lora_A`
is `(C, in)`, `lora_B` `(out, C)` and its gate `(C,)`. Only `L1RAState.live` says which slots hold ranks. A dead slot
has gate 0, a zero B column and a zero A row: A, B and the gate get exactly zero gradient there and the forward needs
no mask. From then on no parameter, optimizer-state tensor or module attribute read in the forward changes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peft.tuners.lora import LoraLayer

from .optim import reset_slot_state_
from .slots import fill_slots_, write_slots_


def new_lora_A_rows(n: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """Rows for new ranks, drawn like PEFT's default init (kaiming_uniform, a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in)))."""
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(n, in_features, generator=generator, dtype=torch.float32) * 2 - 1) * bound


def _padded(param: nn.Parameter, dim: int, extra: int) -> nn.Parameter:
    shape = list(param.shape)
    shape[dim] = extra
    data = torch.cat([param.detach(), param.new_zeros(shape)], dim=dim)
    return nn.Parameter(data.contiguous(), requires_grad=param.requires_grad)


@torch.no_grad()
def grow_to_capacity_(layer: LoraLayer, adapter: str, capacity: int) -> None:
    """Append `capacity - r` dead slots (zero A rows, zero B columns) to the adapter. PEFT's `layer.r` becomes the
    capacity; `layer.scaling` is left as PEFT computed it from the initial rank. Call before the gate is attached."""
    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    extra = capacity - lora_A.weight.shape[0]
    assert extra >= 0, "capacity below the initial rank"
    if extra:
        lora_A.weight = _padded(lora_A.weight, 0, extra)
        lora_B.weight = _padded(lora_B.weight, 1, extra)
        lora_A.out_features = lora_B.in_features = capacity
    layer.r[adapter] = capacity


def adapter_tensors(layer: LoraLayer, adapter: str) -> dict[str, tuple[nn.Parameter, int]]:
    """`{kind: (parameter, rank dim)}` for the adapter's A, B and gate."""
    return {
        "A": (layer.lora_A[adapter].weight, 0),
        "B": (layer.lora_B[adapter].weight, 1),
        "gate": (layer.l1ra_gate[adapter], 0),
    }


@torch.no_grad()
def set_slots_(layer: LoraLayer, adapter: str, slots: list[int], a_rows: torch.Tensor, gate_values: torch.Tensor,
               optimizer=None) -> None:
    """Slots `slots` get A rows `a_rows`, gates `gate_values` and zero B columns; their optimizer state is zeroed.

    Pruning passes zero rows and gates (the slot becomes dead); reviving passes new rows and gates of 1 (the B column
    is 0, so the model's output does not change either way when the pruned gates were 0)."""
    if not slots:
        return
    tensors = adapter_tensors(layer, adapter)
    a, _ = tensors["A"]
    b, _ = tensors["B"]
    gate, _ = tensors["gate"]
    write_slots_(a, 0, slots, a_rows)
    fill_slots_(b, 1, slots, 0.0)
    write_slots_(gate, 0, slots, gate_values)
    for p, dim in tensors.values():
        reset_slot_state_(optimizer, p, dim, slots)
