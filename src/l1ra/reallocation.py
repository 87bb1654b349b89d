"""The reallocation: prune the ranks whose gate reached the threshold, revive dead slots for the receivers, in place;
and the per-step sensitivity sums that can order the receivers. Works on an `L1RAState`; `l1ra.reallocate` (in
`l1ra.model`) is the public entry point."""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from . import distributed, revive
from .allocator import plan_reallocation
from .gates import gate_sensitivity
from .history import ReallocationEvent
from .optim import install_seed_hook
from .resize import new_lora_A_rows, set_slots_
from .slots import full, write_slots_
from .state import L1RAState, rank_costs


def accumulate_sensitivity_(peft_model, kept: Optional[torch.Tensor] = None) -> None:
    """Add this step's `|gate * grad|` to the per-rank sums that order the receivers (receiver_signal='sensitivity').
    DDP has averaged the gradients already, so every process adds the same numbers. `kept` (0-dim, on the device):
    0 adds nothing (a skipped step, whose gradients hold inf/NaN)."""
    st = peft_model.l1ra_state
    step_sensitivity = gate_sensitivity(list(st.gates().values()))
    if step_sensitivity is None:
        raise ValueError(
            "L1RAConfig.receiver_signal='sensitivity' reads the gates' gradients, but none has one: call "
            "l1ra.after_optimizer_step after optimizer.step() and before optimizer.zero_grad()."
        )
    if kept is not None:
        step_sensitivity = torch.where(kept.to(step_sensitivity.device) > 0, step_sensitivity, 0.0)
    st.sensitivity = step_sensitivity if st.sensitivity is None else st.sensitivity.add_(step_sensitivity)


def receiver_priority(st, sensitivity: Optional[torch.Tensor]) -> Optional[list[float]]:
    """Per-adapter mean sensitivity of the live slots since the last reallocation (None: the allocator's order)."""
    caps = list(st.capacities().values())
    if st.config.receiver_signal != "sensitivity" or sensitivity is None or sensitivity.numel() != sum(caps):
        return None
    parts = torch.split(sensitivity.float().cpu(), caps)
    return [float(part[st.live[name]].mean()) for (name, _), part in zip(st.layers, parts)]


def _generator(seed: int, count: int) -> torch.Generator:
    # Same draws on every process and device: a CPU generator derived from (seed, reallocation count).
    return torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + count) % (2**63))


def _agreed_gate_values(st) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
    """Every adapter's full gate vector (CPU fp32) and the sensitivity sums, as rank 0 holds them: with several
    processes both are broadcast from rank 0, so every process plans the same reallocation."""
    live = list(st.gates().values())
    values = [full(g) for g in live]
    flat = distributed.gather_flat(values)  # one device sync
    sensitivity = None if st.sensitivity is None else distributed.gather_flat([st.sensitivity])
    agreed, sensitivity = distributed.agree_from_rank0(flat, sensitivity)
    if not torch.equal(agreed, flat):
        warnings.warn(
            f"l1ra: gates differed between processes (max difference {float((agreed - flat).abs().max()):.3g}); "
            "using rank 0's values for the reallocation.",
            stacklevel=3,
        )
        for gate, value in zip(live, torch.split(agreed, [g.numel() for g in live])):
            write_slots_(gate, 0, list(range(gate.shape[0])), value)
    return list(torch.split(agreed, [g.numel() for g in live])), sensitivity


@torch.no_grad()
def reallocate_state_(st: L1RAState, optimizer=None) -> ReallocationEvent:
    """`l1ra.reallocate` on the model's L1RA state (the caller has found the model and checked its setup)."""
    cfg = st.config
    install_seed_hook(optimizer, st)
    full_gates, sensitivity = _agreed_gate_values(st)
    live_values = [g[st.live[name]] for (name, _), g in zip(st.layers, full_gates)]
    plans = plan_reallocation(
        live_values,
        prune_threshold=cfg.prune_threshold,
        min_rank=cfg.min_rank,
        max_rank=list(st.capacities().values()),
        reassign=cfg.reassign,
        exclude_pruned=cfg.exclude_pruned,
        priority=receiver_priority(st, sensitivity),
        # a parameter budget carries what a round could not spend over to the next round
        **(dict(costs=rank_costs(st.layers, st.adapter, "params"), budget=st.budget)
           if getattr(cfg, "budget_unit", "rank") == "params" else {}),
    )
    rows = _new_rows(st, plans)
    pruned, added = {}, {}
    for (name, layer), plan in zip(st.layers, plans):
        live = st.live[name]
        if plan.n_new == 0 and len(plan.keep) == len(live):
            continue
        pruned_n, new_slots = _apply_plan(st, name, layer, plan, rows[name], optimizer)
        if pruned_n:
            pruned[name] = pruned_n
        if new_slots:
            added[name] = len(new_slots)
    st.reallocations += 1
    st.sensitivity = None  # the next interval's receivers are judged on that interval's gradients
    event = ReallocationEvent(step=st.step, ranks=st.ranks(), pruned=pruned, added=added)
    st.history.record(event)
    return event


def _new_rows(st, plans) -> dict[str, torch.Tensor]:
    """Each adapter's A rows for its new ranks (n_new x in, fp32, CPU): random like LoRA's init, or (new_rank_init=
    'gradient') the sketched gradient's top directions orthogonal to the surviving rows, the same on every process."""
    generator = _generator(st.config.seed, st.reallocations)
    rows = {name: new_lora_A_rows(plan.n_new, layer.lora_A[st.adapter].in_features, generator)
            for (name, layer), plan in zip(st.layers, plans)}
    if st.config.new_rank_init != "gradient":
        return rows
    sketches = revive.disarm(st)
    if sketches is None:
        warnings.warn(
            "l1ra: new_rank_init='gradient' found no sketched gradient (reallocate was called outside the schedule of "
            "after_optimizer_step); the new ranks start from random rows made orthogonal to the live ones.",
            stacklevel=3,
        )
    receivers = [(name, layer, plan) for (name, layer), plan in zip(st.layers, plans) if plan.n_new]
    for name, layer, plan in receivers:
        a = full(layer.lora_A[st.adapter].weight)
        kept = a[[st.live[name][k] for k in plan.keep]]
        rows[name] = revive.gradient_rows(sketches.get(name) if sketches else None, kept, plan.n_new, rows[name])
    if receivers:  # one broadcast: every process writes rank 0's rows
        flat = distributed.from_rank0(torch.cat([rows[name].reshape(-1) for name, _, _ in receivers]))
        for (name, _, _), part in zip(receivers, torch.split(flat, [rows[n].numel() for n, _, _ in receivers])):
            rows[name] = part.view_as(rows[name])
    return rows


def _apply_plan(st, name: str, layer, plan, rows: torch.Tensor, optimizer) -> tuple[int, list[int]]:
    """Kill the adapter's pruned slots, revive the lowest dead slots for its new ranks; update the live record and the
    slots waiting for their Adam moments to be seeded. Returns (ranks pruned, revived slots)."""
    live = st.live[name]
    keep = [live[k] for k in plan.keep]
    kept = set(keep)
    pruned = [s for s in live if s not in kept]
    new_slots = [s for s in range(layer.r[st.adapter]) if s not in kept][: plan.n_new]
    killed = [s for s in pruned if s not in new_slots]
    a = layer.lora_A[st.adapter].weight
    slots = killed + new_slots
    a_rows = torch.cat([torch.zeros(len(killed), a.shape[1]), rows]) if killed else rows
    gate_values = torch.cat([torch.zeros(len(killed)), torch.ones(len(new_slots))])
    set_slots_(layer, st.adapter, slots, a_rows, gate_values, optimizer)
    st.live[name] = sorted(keep + new_slots)
    revive.end_grace(st, name, slots)
    revive.start_grace(st, name, new_slots, st.config.grace_steps(st.total_steps))
    for kind in ("A", "B", "gate"):
        waiting = [s for s in st.pending.pop((name, kind), []) if s not in set(slots)] + new_slots
        if waiting:
            st.pending[(name, kind)] = sorted(waiting)
    return len(pruned), new_slots
