"""`L1RAState`, what an L1RA model keeps beside PEFT's LoRA weights, and the helpers that read it or keep PEFT's own
config in step with it. A low module: `l1ra.checkpoint` and `l1ra.model` both use it, neither imports the other
through it."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from peft.tuners.lora import LoraLayer

from .config import L1RAConfig
from .history import RankHistory


@dataclass
class L1RAState:
    """Everything L1RA keeps beside PEFT's LoRA weights (saved in `l1ra_state.json` / `.safetensors` for resuming).

    Every adapter holds `capacity` slots (PEFT's `layer.r`); `live[name]` lists the slots that hold ranks (sorted),
    the rest are dead (gate 0, zero A row and B column)."""

    config: L1RAConfig
    adapter: str
    budget: int  # in the config's budget_unit: ranks, or LoRA parameters (see model.rank_costs)
    step: int = 0  # optimizer steps seen by after_optimizer_step
    reallocations: int = 0
    history: RankHistory = field(default_factory=RankHistory)
    layers: list[tuple[str, LoraLayer]] = field(default_factory=list, repr=False)  # (module name, LoraLayer) of every gated adapter
    live: dict[str, list[int]] = field(default_factory=dict)  # module name -> live slot indices, sorted
    # Revived slots whose Adam moments wait to be seeded from their first gradient: (module, 'A'|'B'|'gate') -> slots
    pending: dict[tuple[str, str], list[int]] = field(default_factory=dict, repr=False)
    # new_rank_grace: module name -> {slot: last optimizer step the slot skips the L1 step}
    grace: dict[str, dict[int, int]] = field(default_factory=dict)
    capture: object = field(default=None, repr=False)  # new_rank_init='gradient': the armed l1ra.revive.GradientCapture
    setup_checked: bool = field(default=False, repr=False)
    # receiver_signal='sensitivity': |gate * grad| per slot (flat over all capacities, module order), summed since the
    # last reallocation
    sensitivity: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def total_steps(self) -> Optional[int]:
        return self.config.total_steps

    def ranks(self) -> dict[str, int]:
        """`{module_name: live rank}`."""
        return {name: len(self.live[name]) for name, _ in self.layers}

    def capacities(self) -> dict[str, int]:
        """`{module_name: capacity}` (the slots each adapter holds; fixed)."""
        return {name: layer.r[self.adapter] for name, layer in self.layers}

    def gates(self) -> dict[str, nn.Parameter]:
        """`{module_name: gate}`: the gate parameters (full capacity, dead slots at 0), in module order."""
        return {name: layer.l1ra_gate[self.adapter] for name, layer in self.layers}

    def slot_params(self) -> dict[tuple[str, str], tuple[nn.Parameter, int]]:
        """`{(module, 'A'|'B'|'gate'): (parameter, rank dim)}`."""
        from .resize import adapter_tensors

        return {(name, kind): v for name, layer in self.layers for kind, v in adapter_tensors(layer, self.adapter).items()}


def rank_costs(layers, adapter: str, unit: str) -> list[int]:
    """What one rank of each adapter costs in the budget's unit: 1 ('rank'), or in_features + out_features
    ('params': one row of A and one column of B)."""
    if unit == "rank":
        return [1] * len(layers)
    return [layer.lora_A[adapter].in_features + layer.lora_B[adapter].out_features for _, layer in layers]


def _alpha(layer, adapter: str, r: int) -> float:
    """The lora_alpha that gives rank `r` the scaling the adapter trains with (`lora_alpha / r_initial`)."""
    scaling = layer.scaling[adapter]
    return scaling * (math.sqrt(r) if layer.use_rslora[adapter] else r)


def sync_lora_config(peft_model) -> None:
    """Keep PEFT's own LoraConfig in step with the model's shapes: `rank_pattern` = each module's capacity and an
    `alpha_pattern` that gives every module the scaling it trains with, so PEFT would rebuild the same modules (and
    `layer.set_scale` keeps the scaling). The saved adapter gets the live ranks instead (see `live_lora_config`)."""
    st: L1RAState = peft_model.l1ra_state
    lora_config = peft_model.peft_config[st.adapter]
    rank_pat, alpha_pat = {}, {}
    for name, layer in st.layers:
        r = layer.r[st.adapter]
        layer.lora_alpha[st.adapter] = alpha = _alpha(layer, st.adapter, r)
        rank_pat[name], alpha_pat[name] = r, alpha
    lora_config.rank_pattern, lora_config.alpha_pattern = rank_pat, alpha_pat


def live_lora_config(peft_model):
    """A copy of PEFT's LoraConfig describing the live ranks (what the saved, compacted adapter holds)."""
    st: L1RAState = peft_model.l1ra_state
    config = copy.deepcopy(peft_model.peft_config[st.adapter])
    ranks = st.ranks()
    config.rank_pattern = dict(ranks)
    config.alpha_pattern = {name: _alpha(layer, st.adapter, ranks[name]) for name, layer in st.layers}
    return config
