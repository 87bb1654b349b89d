"""L1RA: L1-regularised rank assignment for LoRA, on PEFT's own LoRA layers."""

from .allocator import AdapterPlan, plan_reallocation
from .config import L1RAConfig
from .checkpoint import CheckpointError, from_pretrained
from .history import RankHistory, ReallocationEvent
from .model import (
    after_optimizer_step,
    create_optimizer,
    find_l1ra_model,
    gates,
    get_l1ra_model,
    rank_history,
    rank_pattern,
    reallocate,
    set_total_steps,
)

__version__ = "0.1.0"


def __getattr__(name):
    # The callback imports transformers' Trainer machinery: load it on demand.
    if name == "L1RACallback":
        from .callback import L1RACallback

        return L1RACallback
    raise AttributeError(f"module 'l1ra' has no attribute {name!r}")


__all__ = [
    "AdapterPlan",
    "CheckpointError",
    "L1RACallback",
    "L1RAConfig",
    "RankHistory",
    "ReallocationEvent",
    "after_optimizer_step",
    "create_optimizer",
    "find_l1ra_model",
    "from_pretrained",
    "gates",
    "get_l1ra_model",
    "rank_history",
    "rank_pattern",
    "reallocate",
    "set_total_steps",
]
