"""Rank history: the ranks after every reallocation and what moved."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
