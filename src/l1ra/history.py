"""Rank history: the ranks after every reallocation and what moved."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class ReallocationEvent:
    step: int
    ranks: dict[str, int]
    pruned: dict[str, int] = field(default_factory=dict)  # module -> ranks removed (only modules that lost rank)
    added: dict[str, int] = field(default_factory=dict)  # module -> ranks added (only modules that gained rank)

    @property
    def moved(self) -> int:
        """Ranks that changed hands in this event."""
        return sum(self.added.values())

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RankHistory:
    events: list[ReallocationEvent] = field(default_factory=list)

    def record(self, event: ReallocationEvent) -> None:
        self.events.append(event)

    @property
    def total_moved(self) -> int:
        return sum(e.moved for e in self.events)

    def to_json(self) -> list[dict]:
        return [e.to_dict() for e in self.events]

    @classmethod
    def from_json(cls, items: list[dict]) -> "RankHistory":
        return cls([ReallocationEvent(**item) for item in items])


def layer_index(name: str) -> Optional[int]:
    """The block number in a module name ('model.layers.3.mlp.up_proj' -> 3); None outside numbered blocks."""
    numbers = [int(p) for p in name.split(".") if p.isdigit()]
    return numbers[-1] if numbers else None


def module_type(name: str) -> str:
    """The module's role, the same in every block: the path after the block number ('model.layers.0.mlp.up_proj' ->
    'mlp.up_proj'; BERT's 'encoder.layer.3.attention.output.dense' -> 'attention.output.dense', which tells its three
    `dense` layers apart). Modules outside numbered blocks keep their last two parts ('bert.pooler.dense' ->
    'pooler.dense')."""
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[digits[-1] + 1 :] if digits else parts[-2:])


def mean_rank_by_type(ranks: dict[str, int]) -> dict[str, float]:
    """`{module type: mean rank over blocks}`, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for name, r in ranks.items():
        groups.setdefault(module_type(name), []).append(r)
    return {t: sum(v) / len(v) for t, v in groups.items()}
