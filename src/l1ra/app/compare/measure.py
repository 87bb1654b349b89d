"""What a run measures besides its score (memory: `l1ra.app.memory`): parameters and ranks (allocated and
effective), the bytes it keeps for training, its data order and the state of L1RA's gates."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def final_ranks(pm: nn.Module) -> tuple[dict, dict, int, int]:
    """({module: allocated rank}, {module: effective rank}, effective trainable parameters, effective LoRA
    parameters (A rows and B columns of active ranks: what a parameter budget counts)).

    Allocated: the rank the tensors have (L1RA: the live ranks; its tensors hold a fixed capacity). Effective: ranks that still act on the output (AdaLoRA: non-zero singular
    values `lora_E` after its masking; L1RA: gates above zero; LoRA: all). Effective parameters subtract the
    A row, B column (and E entry / gate) of every inactive rank from the trainable count.
    """
    from peft.tuners.adalora import AdaLoraLayer
    from peft.tuners.lora import LoraLayer

    allocated, effective = {}, {}
    inactive_params = lora_params = 0
    root = pm.base_model.model if hasattr(pm, "base_model") else pm
    for name, m in root.named_modules():
        if not isinstance(m, LoraLayer) or "default" not in m.lora_A:
            continue
        a, b = m.lora_A["default"], m.lora_B["default"]
        if isinstance(m, AdaLoraLayer):
            e = m.lora_E["default"].detach().flatten()
            r_alloc, r_eff = e.numel(), int((e != 0).sum())
            in_f, out_f = a.shape[1], b.shape[0]
            per_rank = in_f + out_f + 1
        else:
            r_alloc = m.r["default"]
            in_f, out_f = a.weight.shape[1], b.weight.shape[0]
            gate = getattr(m, "l1ra_gate", {}).get("default") if hasattr(m, "l1ra_gate") else None
            r_eff = int((gate.detach().clamp(0, 1) > 0).sum()) if gate is not None else r_alloc
            per_rank = in_f + out_f + (1 if gate is not None else 0)
        # L1RA adapters hold a fixed capacity (m.r): report the live ranks; dead slots count as inactive parameters
        live = getattr(getattr(pm, "l1ra_state", None), "live", {}).get(name)
        allocated[name], effective[name] = (len(live) if live is not None else r_alloc), r_eff
        inactive_params += (r_alloc - r_eff) * per_rank
        lora_params += r_eff * (in_f + out_f)
    return allocated, effective, trainable_params(pm) - inactive_params, lora_params


def training_state_mb(pm: nn.Module, opt) -> float:
    """MiB held for training beyond the frozen model: trainable parameters, optimizer state and (AdaLoRA) the
    rank allocator's importance statistics. Gradients are freed after every step (`zero_grad(set_to_none=True)`)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for p in pm.parameters():
        if p.requires_grad:
            add(p)
    for state in opt.state.values():
        for v in state.values():
            add(v)
    allocator = getattr(getattr(pm, "base_model", None), "rankallocator", None)
    for name in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        for v in getattr(allocator, name, {}).values():
            add(v)
    return total / 2**20


def data_order_hash(batches: list) -> str:
    """A fingerprint of the training batches (inputs and labels, in order): equal for two runs iff they saw the same
    data in the same order."""
    h = hashlib.sha256()
    for b in batches:
        for key in sorted(b):
            if isinstance(b[key], torch.Tensor):
                h.update(key.encode())
                h.update(b[key].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def gate_quantiles(pm) -> dict:
    from ...model import gates

    flat = torch.cat([g.detach().float().clamp(0, 1).flatten() for g in gates(pm).values()])
    qs = torch.quantile(flat, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]))
    return {"min": float(qs[0]), "p10": float(qs[1]), "median": float(qs[2]), "p90": float(qs[3]),
            "max": float(qs[4]), "zero_fraction": float((flat == 0).float().mean())}
