"""Rank reallocation as plain functions on gate vectors: no PEFT, no transformers.

`plan_reallocation` decides, from each adapter's gate vector, which ranks survive and how many new ranks each
adapter receives. Applying the plan to the model lives in `l1ra.resize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch


@dataclass(frozen=True)
class AdapterPlan:
    keep: tuple[int, ...]  # indices of surviving ranks, in their original order
    n_new: int  # ranks appended after the survivors

    @property
    def rank(self) -> int:
        return len(self.keep) + self.n_new

    def pruned(self, old_rank: int) -> int:
        return old_rank - len(self.keep)


def prune_mask(gate: torch.Tensor, prune_threshold: float, min_rank: int) -> torch.Tensor:
    """Boolean mask of ranks to keep: gate > threshold, topped up with the largest gates to reach `min_rank`."""
    gate = gate.detach().float().clamp(0, 1)
    keep = gate > prune_threshold
    missing = min(min_rank, gate.numel()) - int(keep.sum())
    if missing > 0:
        # Stable order: among the pruned, revive the largest gates, earliest index first on ties.
        candidates = (~keep).nonzero().flatten()
        order = torch.sort(gate[candidates], descending=True, stable=True).indices
        keep[candidates[order[:missing]]] = True
    return keep


def plan_reallocation(
    gates: Sequence[torch.Tensor],
    *,
    prune_threshold: float = 0.0,
    min_rank: int = 1,
    max_rank: Union[None, int, Sequence[int]] = None,
    reassign: bool = True,
    exclude_pruned: bool = True,
    costs: Optional[Sequence[int]] = None,
    budget: Optional[int] = None,
    priority: Optional[Sequence[float]] = None,
) -> list[AdapterPlan]:
    """Prune weak ranks and hand the freed budget out again.

    Receivers are sorted by their smallest surviving gate, largest first (an adapter whose weakest rank is still
    strong wants more rank), and served one rank at a time, round-robin; a receiver that cannot afford one more rank
    from what is left is skipped. Adapters pruned in this round are skipped when `exclude_pruned`, unless no other
    adapter can take a rank.

    `costs[i]`: what one rank of adapter i costs (default 1 each: the budget counts ranks; `in + out` counts LoRA
    parameters). `priority[i]`: replaces the smallest surviving gate as the receivers' order (largest first), e.g. a
    gradient signal. `budget`: the total to spend (default: what the gates cost now, `sum(costs[i] * len(gates[i]))`).
    `max_rank`: the most ranks any adapter may hold, or one cap per adapter (e.g. each adapter's capacity).
    Afterwards `sum(costs[i] * plan.rank) <= budget`, and what is left is smaller than one rank of any adapter still
    under its cap (with unit costs nothing is left: the rank total stays exactly at the budget).
    """
    costs = [1] * len(gates) if costs is None else [int(c) for c in costs]
    if len(costs) != len(gates) or any(c < 1 for c in costs):
        raise ValueError(f"costs must give one positive integer per adapter ({len(gates)}), got {costs}")
    if priority is not None and len(priority) != len(gates):
        raise ValueError(f"priority must give one number per adapter ({len(gates)}), got {len(priority)}")
    if max_rank is None or isinstance(max_rank, (int, float)):
        caps = [float("inf") if max_rank is None else max_rank] * len(gates)
    else:
        caps = list(max_rank)
        if len(caps) != len(gates):
            raise ValueError(f"max_rank must give one cap per adapter ({len(gates)}), got {len(caps)}")
    keeps = [prune_mask(g, prune_threshold, min_rank) for g in gates]
    kept = [int(k.sum()) for k in keeps]
    if budget is None:
        budget = sum(c * g.numel() for c, g in zip(costs, gates))
    left = budget - sum(c * k for c, k in zip(costs, kept))
    n_new = [0] * len(gates)
    if reassign and left > 0:
        if priority is None:
            priority = [float(g.detach().float().clamp(0, 1)[k].min()) for g, k in zip(gates, keeps)]
        order = sorted(range(len(gates)), key=lambda i: -float(priority[i]))  # sorted() is stable: ties by index
        pruned = {i for i in range(len(gates)) if kept[i] < gates[i].numel()}
        tiers = [[i for i in order if i not in pruned], order] if exclude_pruned else [order]
        for tier in tiers:
            while True:
                served = False
                for i in tier:  # one round: each receiver that has room and can afford a rank takes one
                    if kept[i] + n_new[i] < caps[i] and costs[i] <= left:
                        n_new[i] += 1
                        left -= costs[i]
                        served = True
                if not served:
                    break
        if left >= min(costs) and all(kept[i] + n_new[i] >= caps[i] for i in range(len(gates))):
            raise ValueError(f"max_rank={max_rank} leaves no room for the freed budget ({left}); raise max_rank.")
    return [
        AdapterPlan(keep=tuple(k.nonzero().flatten().tolist()), n_new=n) for k, n in zip(keeps, n_new)
    ]


def is_reallocation_step(step: int, interval: int, total_steps: Optional[int]) -> bool:
    """Reallocate every `interval` optimizer steps, but not at the last step (new ranks would never train)."""
    if step <= 0 or step % interval:
        return False
    return total_steps is None or step < total_steps
