"""`get_l1ra_model` and the training-time API: gates, ranks, the per-step L1 and the reallocation."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import peft
from peft import PeftModel
from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from peft.tuners.lora import LoraLayer

from . import amp, distributed, revive
from .allocator import is_reallocation_step
from .checkpoint import load_into, read_config, save_l1ra
from .config import L1RAConfig
from .gates import attach_gate, shrink_gates_
from .history import RankHistory, ReallocationEvent
from .optim import group_lr_of, install_seed_hook, local_gates, param_groups
from .reallocation import accumulate_sensitivity_, reallocate_state_
from .resize import grow_to_capacity_
from .slots import fill_slots_
from .state import L1RAState, rank_costs, sync_lora_config


class L1RAModelMixin:
    """Mixed into PEFT's own `PeftModel` classes: the model stays a `peft.PeftModel` (and e.g. a
    `PeftModelForCausalLM`), and saving writes a plain PEFT LoRA adapter. See `l1ra.checkpoint`."""

    l1ra_state: L1RAState

    def save_pretrained(self, save_directory, **kwargs):
        check_single_adapter(self)  # PEFT would save the others in subfolders that the L1RA save does not keep
        save_l1ra(self, save_directory, super_save=super().save_pretrained, **kwargs)

    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        if adapter_name == self.l1ra_state.adapter:
            result = load_into(self, model_id)
            arm_gradient_capture(self.l1ra_state)  # a resume right before a reallocation
            return result
        raise ValueError(one_adapter_message(self, adapter_name))

    # Merging needs nothing here: every gated layer's `get_delta_weight` includes its gate (see l1ra.gates), so
    # PEFT's merge_adapter / unmerge_adapter / merge_and_unload are exact, also on `base_model`.

    def add_adapter(self, adapter_name, peft_config, *args, **kwargs):
        raise ValueError(one_adapter_message(self, adapter_name))

    def add_weighted_adapter(self, *args, **kwargs):
        raise ValueError(
            "add_weighted_adapter: an L1RA model holds one adapter, and PEFT's weighted combinations read lora_A "
            "without the L1RA gates. Save the adapter (model.save_pretrained, a plain PEFT LoRA with the gates folded "
            "in), load it with peft.PeftModel.from_pretrained, and combine adapters there."
        )


def one_adapter_message(peft_model, other) -> str:
    st = peft_model.l1ra_state
    return (
        f"an L1RA model holds one adapter ({st.adapter!r}); another ({other!r}) would be trained, saved and pruned "
        "wrongly (the L1 acts on the L1RA gates whichever adapter is active, and the L1RA save writes one adapter). "
        "Save the L1RA adapter (model.save_pretrained) and load it with peft.PeftModel.from_pretrained to combine it "
        "with other adapters" + (f", or remove the other one with model.delete_adapter({other!r})." if other in peft_model.peft_config else ".")
    )


def check_gate_dtype(peft_model) -> None:
    """Gates are created in fp32 (see l1ra.gates); refuse gates that a later `model.to(dtype)` cast."""
    cast = {str(g.dtype) for g in peft_model.l1ra_state.gates().values() if g.dtype != torch.float32}
    if cast:
        raise ValueError(
            f"the L1RA gates are {', '.join(sorted(cast))}, not float32 (was the model cast with .to(dtype) or .half() "
            "after get_l1ra_model?): in low precision the proximal L1 step rounds away. Cast the base model before "
            "get_l1ra_model (pass autocast_adapter_dtype=False to keep the adapters in its dtype); the gates stay fp32."
        )


def check_single_adapter(peft_model) -> None:
    """Refuse a model that holds adapters beside the L1RA one (added through PEFT's lower-level APIs)."""
    others = [name for name in peft_model.peft_config if name != peft_model.l1ra_state.adapter]
    if others:
        raise ValueError(one_adapter_message(peft_model, others[0]))


_CLASSES: dict[type, type] = {}


def _l1ra_class(cls: type) -> type:
    """`L1RA<PeftModel class>`: defined once per PEFT class, at module level so models stay picklable."""
    if cls not in _CLASSES:
        new = type(f"L1RA{cls.__name__}", (L1RAModelMixin, cls), {"__module__": __name__})
        globals()[new.__name__] = new
        _CLASSES[cls] = new
    return _CLASSES[cls]


# PEFT's own classes get theirs at import, so that a pickled model unpickles in a fresh process.
for _cls in (PeftModel, *MODEL_TYPE_TO_PEFT_MODEL_MAPPING.values()):
    _l1ra_class(_cls)


def get_l1ra_model(
    model: nn.Module, config: L1RAConfig, adapter_name: str = "default", autocast_adapter_dtype: bool = True
) -> PeftModel:
    """Wrap `model` with PEFT's LoRA layers plus L1RA gates. Returns a `peft.PeftModel` (task subclass included)."""
    if not isinstance(config, L1RAConfig):
        raise ValueError(
            f"get_l1ra_model needs an l1ra.L1RAConfig, got {type(config).__name__}; build one with the same "
            "arguments: L1RAConfig(r=..., target_modules=..., ...)."
        )
    peft_model = peft.get_peft_model(
        model, config.to_lora_config(), adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype
    )
    inner = peft_model.base_model.model
    layers = [(n, m) for n, m in inner.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.r]
    unsupported = [
        f"{n} ({type(m.get_base_layer()).__name__})"
        for n, m in layers
        if not isinstance(m.lora_A[adapter_name] if adapter_name in m.lora_A else None, nn.Linear)
    ]
    if unsupported:
        peft_model.unload()  # give the user their model back untouched
        raise ValueError(
            f"L1RA adapts linear layers (nn.Linear, GPT-2 Conv1D) only; target_modules also matched: "
            f"{', '.join(unsupported[:5])}. Remove these from target_modules (or use target_modules='all-linear')."
        )
    ranks = {n: m.r[adapter_name] for n, m in layers}
    for name, layer in layers:  # once, before any optimizer or wrapper exists: shapes never change afterwards
        capacity = config.capacity(ranks[name])
        grow_to_capacity_(layer, adapter_name, capacity)
        gate = attach_gate(layer, adapter_name)
        fill_slots_(gate, 0, list(range(ranks[name], capacity)), 0.0)
    peft_model.__class__ = _l1ra_class(type(peft_model))
    costs = rank_costs(layers, adapter_name, config.budget_unit)
    peft_model.l1ra_state = L1RAState(
        config=config, adapter=adapter_name, budget=sum(c * r for c, r in zip(costs, ranks.values())), layers=layers,
        live={n: list(range(r)) for n, r in ranks.items()},
    )
    peft_model.l1ra_state.history.record(ReallocationEvent(step=0, ranks=ranks))
    sync_lora_config(peft_model)
    return peft_model


def find_l1ra_model(model: nn.Module) -> PeftModel:
    """The L1RA `PeftModel` inside wrappers (DDP, Accelerate, torch.compile)."""
    current = model
    for _ in range(16):
        if isinstance(current, L1RAModelMixin):
            return current
        inner = current._modules.get("module") or current._modules.get("_orig_mod")
        if inner is None:
            break
        current = inner
    raise ValueError(
        f"{type(model).__name__} holds no L1RA adapters; wrap the model with l1ra.get_l1ra_model(model, L1RAConfig(...))."
    )


def gates(model: nn.Module) -> dict[str, nn.Parameter]:
    """`{module_name: gate}`: the gate parameters, in module order. Each holds the adapter's full capacity; dead
    slots are 0 (see `live_slots`)."""
    return find_l1ra_model(model).l1ra_state.gates()


def live_slots(model: nn.Module) -> dict[str, list[int]]:
    """`{module_name: indices of the live slots}` (sorted); `gates(model)[name][live_slots(model)[name]]` are the live
    gates."""
    return {name: list(slots) for name, slots in find_l1ra_model(model).l1ra_state.live.items()}


def rank_pattern(model: nn.Module) -> dict[str, int]:
    """`{module_name: live rank}`."""
    return find_l1ra_model(model).l1ra_state.ranks()


def capacities(model: nn.Module) -> dict[str, int]:
    """`{module_name: capacity}`: the most ranks each adapter can hold (fixed for the model's life)."""
    return find_l1ra_model(model).l1ra_state.capacities()


def rank_history(model: nn.Module) -> RankHistory:
    return find_l1ra_model(model).l1ra_state.history


def set_total_steps(model: nn.Module, total_steps: int) -> None:
    """Tell L1RA the run's length (needed when `update_every` is a fraction)."""
    find_l1ra_model(model).l1ra_state.config.total_steps = int(total_steps)


def create_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    optimizer_cls: type = torch.optim.AdamW,
    **kwargs,
) -> torch.optim.Optimizer:
    """An optimizer with the adapters at `lr` (weight decay on matrices only) and the gates at the config's `eta_c`
    with no weight decay. Any `torch.optim.Optimizer` class works; `kwargs` go to it."""
    peft_model = find_l1ra_model(model)
    groups = param_groups(
        peft_model, lr, weight_decay, peft_model.l1ra_state.config.eta_c, gates(peft_model).values()
    )
    optimizer = optimizer_cls(groups, lr=lr, **kwargs)
    install_seed_hook(optimizer, peft_model.l1ra_state)
    return optimizer


def gate_learning_rates(
    model: nn.Module,
    optimizer,
    fix: str = "build it with l1ra.create_optimizer(model, lr=...) or add list(l1ra.gates(model).values()) to a "
    "param group",
) -> list[float]:
    """Current learning rate of each gate's param group; a clear error if the optimizer does not hold the gates."""
    lrs = group_lr_of(optimizer, list(gates(model).values()))
    if any(lr is None for lr in lrs):
        raise ValueError(f"the optimizer does not hold the L1RA gates, so they would never train; {fix}.")
    return [float(lr) for lr in lrs]


def apply_l1_(model: nn.Module, optimizer, l1ra_lambda: Optional[float] = None, *, kept=None) -> None:
    """Proximal L1 step on every gate, with `tau = (current lr of the gate's param group) * l1ra_lambda`
    (default: the config's), then the projection to [0, 1]. `kept`: see `l1ra.gates.shrink_gates_`."""
    peft_model = find_l1ra_model(model)
    lam = peft_model.l1ra_state.config.l1ra_lambda if l1ra_lambda is None else l1ra_lambda
    lrs = gate_learning_rates(peft_model, optimizer)
    shrink_gates_(local_gates(list(gates(peft_model).values())), [lr * lam for lr in lrs], kept=kept)


def after_optimizer_step(
    model: nn.Module, optimizer, *, step: Optional[int] = None, optimizer_step_skipped: Optional[bool] = None,
    scaler=None,
) -> Optional[ReallocationEvent]:
    """Call once after every `optimizer.step()` (after the last micro-batch of an accumulation, never between):
    proximal L1 on the gates, then a reallocation when one is due. Returns the reallocation event, if any.

    `step`: the optimizer step just taken (1-based); default: count calls. `optimizer_step_skipped`: the optimizer
    skipped this step (e.g. fp16 overflow); default: found out on the device, without a host sync, from the
    `GradScaler` that stepped it: `scaler` in a plain loop (call this between `scaler.step(optimizer)` and
    `scaler.update()`, or after both), Accelerate's own for an `AcceleratedOptimizer` (see `l1ra.amp`). A skipped
    step leaves the gates and the sensitivity sums as they were.
    """
    peft_model = find_l1ra_model(model)
    st = peft_model.l1ra_state
    interval = st.config.update_interval(st.total_steps)  # raises before any state changes
    l1_start = st.config.l1_start_step(st.total_steps)
    check_single_adapter(peft_model)
    if not st.setup_checked:
        distributed.check_not_sharded(model, optimizer)
        check_gate_dtype(peft_model)
        install_seed_hook(optimizer, st)
        st.setup_checked = True
    skipped = amp.step_skipped(optimizer, scaler) if optimizer_step_skipped is None else bool(optimizer_step_skipped)
    step = int(step) if step is not None else st.step + 1
    if skipped is not True:
        live = list(st.gates().values())
        kept = amp.kept_factor(skipped, live[0].device) if live else None
        if st.config.receiver_signal == "sensitivity":
            accumulate_sensitivity_(peft_model, kept)  # reads the gradients before the L1 step moves the gates
        held = revive.held_gates(st, step) if st.grace else []  # new ranks in their grace period skip the L1 step
        apply_l1_(peft_model, optimizer, None if step > l1_start else 0.0, kept=kept)  # before l1_start: only the box
        revive.restore_held(held)
    st.step = step
    event = reallocate(model, optimizer) if is_reallocation_step(st.step, interval, st.total_steps) else None
    arm_gradient_capture(st)
    return event


def arm_gradient_capture(st) -> None:
    """new_rank_init='gradient': sketch the weight gradients during the coming optimizer step when a reallocation
    follows it (called after every optimizer step, and after a resume)."""
    cfg = st.config
    if cfg.new_rank_init != "gradient" or (st.total_steps is None and not isinstance(cfg.update_every, int)):
        return
    if is_reallocation_step(st.step + 1, cfg.update_interval(st.total_steps), st.total_steps):
        revive.arm(st, cfg.seed)


@torch.no_grad()
def reallocate(model: nn.Module, optimizer=None) -> ReallocationEvent:
    """Prune ranks whose gate reached the threshold and hand them to other adapters, now, in place.

    The model's output does not change (with `prune_threshold=0`), the total rank stays at the budget (with
    `reassign=True`), no parameter or optimizer-state tensor is replaced, and `optimizer` (if given) keeps its state
    for every surviving rank; pruned and revived slots get fresh (zero) state, and revived slots' Adam moments are
    seeded from their first gradient (see `l1ra.optim.SeedHook`).
    """
    peft_model = find_l1ra_model(model)
    distributed.check_not_sharded(model, optimizer)
    return reallocate_state_(peft_model.l1ra_state, optimizer)


def from_pretrained(model: nn.Module, directory, adapter_name: str = "default", is_trainable: bool = False) -> PeftModel:
    """Rebuild the L1RA model saved in `directory` on top of `model` (for resuming or inspecting ranks).

    To use the adapter for inference only, plain `peft.PeftModel.from_pretrained(model, directory)` works too.
    """
    config = read_config(directory)
    config.inference_mode = not is_trainable
    peft_model = get_l1ra_model(model, config, adapter_name=adapter_name)
    load_into(peft_model, directory)
    if is_trainable:
        arm_gradient_capture(peft_model.l1ra_state)
    return peft_model
