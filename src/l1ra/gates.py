"""Gate vectors on PEFT's own LoRA layers: attach, find, apply (forward hook), shrink (proximal L1 step).

The gate of adapter `a` on a `peft.tuners.lora.LoraLayer` lives in `layer.l1ra_gate[a]` (a name without `lora_`, so
PEFT's adapter state-dict filter never sees it). A forward hook on `layer.lora_A[a]` multiplies A's output by the
gate, which gives `delta = B diag(c) A x * scaling` without touching PEFT's forward. The layer's class becomes a
gate-aware subclass of its PEFT class (`gated_class`) whose `get_delta_weight` includes the gate, so PEFT's own merge,
unmerge and merge_and_unload (on the PeftModel or its `base_model`) compute `W + scaling * B diag(c) A`. The gates stay in [0, 1] because
the proximal step (`shrink_gates_`) projects them there after every optimizer step; clamping again in the forward
would cost a little on every step for nothing.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
from torch import nn

from peft.tuners.lora import Linear as LoraLinear, LoraLayer
from peft.utils.other import transpose

GATE_ATTR = "l1ra_gate"
_LAYER_REF = "_l1ra_layer"  # back reference from lora_A[a] to its LoraLayer, kept out of the module tree


class GateHook:
    """Forward hook on `lora_A[adapter]`: scale A's output by the gate. Picklable and deep-copyable.

    Replica-safe: `nn.DataParallel` runs copies of the module tree whose `__dict__` is copied, so in a replica on
    another GPU the back reference still names the original layer, and its gate sits on the first GPU. The gate is
    therefore brought to the output's device (a no-op on one device); autograd sends its gradient back to the
    original gate, which is where DataParallel sums the replicas' gradients anyway."""

    def __init__(self, adapter: str):
        self.adapter = adapter

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        gate = module.__dict__[_LAYER_REF].l1ra_gate[self.adapter]
        return output * gate.to(device=output.device, dtype=output.dtype)


class GatedLoraLayer:
    """Mixed in before a PEFT LoRA layer class: `get_delta_weight` (what PEFT merges) includes the gate."""

    def get_delta_weight(self, adapter) -> torch.Tensor:
        gates = self._modules.get(GATE_ATTR)
        if gates is None or adapter not in gates:
            return super().get_delta_weight(adapter)
        weight_a, weight_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        dtype = weight_b.dtype
        # Like PEFT: half-precision matmuls are slow on CPU, so compute those in fp32 and cast back.
        compute = torch.float32 if weight_b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) else dtype
        gate = gates[adapter].to(compute).unsqueeze(1)
        delta = weight_b.to(compute) @ (weight_a.to(compute) * gate)
        return (transpose(delta, getattr(self, "fan_in_fan_out", False)) * self.scaling[adapter]).to(dtype)


_GATED: dict[type, type] = {}


def gated_class(cls: type) -> type:
    """`L1RA<cls>`: defined once per PEFT layer class, at module level so that models stay picklable."""
    if issubclass(cls, GatedLoraLayer):
        return cls
    if cls not in _GATED:
        name = f"L1RA{cls.__name__}"
        while name in globals():
            name += "_"
        new = type(name, (GatedLoraLayer, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = new
        _GATED[cls] = new
    return _GATED[cls]


# The usual class exists from import on, so that a pickled model unpickles in a fresh process.
L1RALinear = gated_class(LoraLinear)


def attach_gate(layer: LoraLayer, adapter: str) -> nn.Parameter:
    """Give `layer` a gate of ones for `adapter` (so the adapter starts exactly as LoRA) and hook it in."""
    lora_A = layer.lora_A[adapter]
    if not isinstance(lora_A, nn.Linear):
        raise TypeError(f"expected an nn.Linear lora_A, got {type(lora_A).__name__}")
    if not hasattr(layer, GATE_ATTR):
        layer.l1ra_gate = nn.ParameterDict()
    weight = lora_A.weight
    # Always fp32, whatever the adapters' dtype: in bf16 a proximal step of tau < 2e-3 would round away near 1, and
    # 50 steps of 2e-3 take a gate to 0.805 instead of 0.9. The hook casts the gate to the activations' dtype.
    gate = nn.Parameter(
        torch.ones(layer.r[adapter], device=weight.device, dtype=torch.float32), requires_grad=weight.requires_grad
    )
    layer.l1ra_gate[adapter] = gate
    layer.__class__ = gated_class(type(layer))
    lora_A.__dict__[_LAYER_REF] = layer
    lora_A.register_forward_hook(GateHook(adapter))
    return gate


@torch.no_grad()
def shrink_gates_(gates: list[torch.Tensor], taus: list[float], kept: Optional[torch.Tensor] = None) -> None:
    """Proximal L1 step for gates in [0, 1]: `c <- clamp(c - tau, 0, 1)` (soft threshold, then the box).

    `kept`: an optional 0-dim fp32 tensor (1: the optimizer step happened, 0: it was skipped) that multiplies tau on
    the device, so a step skipped by a GradScaler leaves the gates alone without a host sync."""
    buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for gate, tau in zip(gates, taus):
        buckets[(tau, gate.device, gate.dtype)].append(gate)
    for (tau, device, _), group in buckets.items():
        if tau and kept is not None:
            torch._foreach_add_(group, kept.to(device, non_blocking=device.type != "cpu"), alpha=-tau)
        elif tau:
            torch._foreach_add_(group, -tau)
        torch._foreach_clamp_min_(group, 0.0)
        torch._foreach_clamp_max_(group, 1.0)


@torch.no_grad()
def gate_sensitivity(gates: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """`|c * dL/dc|` for every rank of every gate, one flat fp32 vector on the first gate's device (the first-order
    change of the loss if that rank were removed). Zeros where a gate has no gradient; None if none has one."""
    grads = [g.grad for g in gates]
    if all(grad is None for grad in grads):
        return None
    device = gates[0].device
    parts = [
        (g.detach().float() * grad.float()).abs_().to(device) if grad is not None
        else torch.zeros(g.numel(), device=device)
        for g, grad in zip(gates, grads)
    ]
    return torch.cat(parts)
