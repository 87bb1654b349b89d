"""`L1RAState`, what an L1RA model keeps beside PEFT's LoRA weights, and the helpers that read it or keep PEFT's own
config in step with it. A low module: `l1ra.checkpoint` and `l1ra.model` both use it, neither imports the other
through it."""

from __future__ import annotations

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
    """Everything L1RA keeps beside PEFT's LoRA weights (saved in `l1ra_state.json` for resuming)."""

    config: L1RAConfig
    adapter: str
    budget: int  # in the config's budget_unit: ranks, or LoRA parameters (see model.rank_costs)
    step: int = 0  # optimizer steps seen by after_optimizer_step
    reallocations: int = 0
    history: RankHistory = field(default_factory=RankHistory)
    layers: list[tuple[str, LoraLayer]] = field(default_factory=list, repr=False)  # (module name, LoraLayer) of every gated adapter
    # Parameters replaced when a checkpoint was loaded (old -> new), for an optimizer built before the load.
    replaced: dict = field(default_factory=dict, repr=False)
    setup_checked: bool = field(default=False, repr=False)
    # receiver_signal='sensitivity': |gate * grad| per rank (flat, module order), summed since the last reallocation
    sensitivity: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def total_steps(self) -> Optional[int]:
        return self.config.total_steps

    def ranks(self) -> dict[str, int]:
        """`{module_name: current rank}`."""
        return {name: layer.r[self.adapter] for name, layer in self.layers}

    def gates(self) -> dict[str, nn.Parameter]:
        """`{module_name: gate}`: the live gate parameters, in module order."""
        return {name: layer.l1ra_gate[self.adapter] for name, layer in self.layers}


def sync_lora_config(peft_model) -> None:
    """Keep PEFT's own LoraConfig in step with the live ranks: `rank_pattern` per module and an `alpha_pattern` that
    gives every module the scaling it trains with (`lora_alpha / r_initial`), so PEFT rebuilds the same adapter."""
    st: L1RAState = peft_model.l1ra_state
    lora_config = peft_model.peft_config[st.adapter]
    rank_pat, alpha_pat = {}, {}
    for name, layer in st.layers:
        r = layer.r[st.adapter]
        scaling = layer.scaling[st.adapter]
        alpha = scaling * (math.sqrt(r) if layer.use_rslora[st.adapter] else r)
        layer.lora_alpha[st.adapter] = alpha
        rank_pat[name], alpha_pat[name] = r, alpha
    lora_config.rank_pattern, lora_config.alpha_pattern = rank_pat, alpha_pat
