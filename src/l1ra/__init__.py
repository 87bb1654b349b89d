"""L1RA: L1-regularised rank assignment for LoRA, on PEFT's own LoRA layers.

Names are loaded on first use (PEP 562), so `import l1ra` is instant and the command line can parse its arguments
before torch, PEFT and transformers are imported.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "AdapterPlan": "allocator",
    "plan_reallocation": "allocator",
    "L1RAConfig": "config",
    "CheckpointError": "checkpoint",
    "from_pretrained": "model",
    "ExportError": "export",
    "export_adapter": "export",
    "RankHistory": "history",
    "ReallocationEvent": "history",
    "after_optimizer_step": "model",
    "capacities": "model",
    "create_optimizer": "model",
    "find_l1ra_model": "model",
    "gates": "model",
    "get_l1ra_model": "model",
    "live_slots": "model",
    "rank_history": "model",
    "rank_pattern": "model",
    "reallocate": "model",
    "set_total_steps": "model",
    "L1RACallback": "callback",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'l1ra' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    # Importing the submodule `l1ra.gates` makes Python set the package attribute `gates` to that module, which would
    # hide the public function `l1ra.gates(model)`: exported names are never replaced by a submodule.
    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from .allocator import AdapterPlan, plan_reallocation
    from .callback import L1RACallback
    from .checkpoint import CheckpointError
    from .config import L1RAConfig
    from .export import ExportError, export_adapter
    from .history import RankHistory, ReallocationEvent
    from .model import (
        after_optimizer_step,
        capacities,
        create_optimizer,
        find_l1ra_model,
        from_pretrained,
        gates,
        get_l1ra_model,
        live_slots,
        rank_history,
        rank_pattern,
        reallocate,
        set_total_steps,
    )
