"""The adapter of each row: the PEFT or L1RA model, its optimizer (the same grouping for every method) and its
per-step hook. Everything else about a run is shared (`worker.run_one`)."""

from __future__ import annotations

import torch
from torch import nn

from .methods import L1RA_METHODS, L1RA_OPTIONS, METHODS


def adapter_param_groups(model: nn.Module, lr: float, weight_decay: float) -> list:
    """The grouping L1RA's `create_optimizer` uses for the adapter weights (matrices decay, vectors do not), for the
    PEFT methods; AdaLoRA's singular values `lora_E` (an (r, 1) column) count as vectors, like L1RA's gates."""
    decay, no_decay = [], []
    e_ids = _adalora_e_ids(model)
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in e_ids else no_decay).append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _adalora_e_ids(model: nn.Module) -> set:
    from peft.tuners.adalora import AdaLoraLayer

    ids = set()
    for m in model.modules():
        if isinstance(m, AdaLoraLayer):
            ids |= {id(p) for p in m.lora_E.values()}
    return ids


def _no_hook(step, opt, skipped=False):
    return None


def _adamw(pm: nn.Module, spec):
    return torch.optim.AdamW(adapter_param_groups(pm, spec.lr, spec.weight_decay), lr=spec.lr)


def _head_only(model: nn.Module, task, spec):
    if not task.head_modules:
        raise ValueError(f"--methods head_only: task {task.name!r} has no classification head; drop head_only")
    for name, p in model.named_parameters():
        p.requires_grad_(any(name == h or name.startswith(h + ".") for h in task.head_modules))
    return model, _adamw(model, spec), _no_hook


def _adalora(model: nn.Module, spec, common: dict):
    import peft

    init_r = max(spec.rank, round(spec.adalora_init_ratio * spec.rank))
    tinit = round(spec.adalora_tinit * spec.steps)
    tfinal = round(spec.adalora_tfinal * spec.steps)
    if tinit >= spec.steps - tfinal:  # very short runs: keep a budgeting phase of at least one step
        tinit, tfinal = 0, max(0, min(tfinal, spec.steps - 1))
    cfg = peft.AdaLoraConfig(
        init_r=init_r,
        target_r=spec.rank,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=max(1, min(spec.adalora_delta_t, spec.steps - tinit - tfinal)),
        total_step=spec.steps,
        orth_reg_weight=spec.adalora_orth_reg_weight,
        **{k: v for k, v in common.items() if k != "r"},
    )
    pm = peft.get_peft_model(model, cfg)

    def after_step(step, opt, skipped=False):
        # PEFT's documented loop: after optimizer.step(), before zero_grad() (it reads the gradients), with the
        # optimizer step count
        pm.base_model.update_and_allocate(step)

    return pm, _adamw(pm, spec), after_step


def _l1ra(model: nn.Module, spec, common: dict):
    from ... import model as l1ra_model
    from ...config import L1RAConfig

    extra = {k: getattr(spec, k) for k in L1RA_OPTIONS if getattr(spec, k) is not None}
    for k in ("update_every", "l1_start"):  # >= 1 is a step count
        if k in extra and float(extra[k]).is_integer() and extra[k] >= 1:
            extra[k] = int(extra[k])
    grace = spec.new_rank_grace
    if spec.capacity_factor is not None:
        extra["max_rank"] = spec.capacity_factor * spec.rank
    cfg = L1RAConfig(**common, reassign=spec.reassign, budget_unit=spec.budget_unit,
                     receiver_signal=spec.receiver_signal, seed=spec.seed, total_steps=spec.steps,
                     new_rank_init=spec.new_rank_init,
                     new_rank_grace=grace if 0 < grace < 1 else int(grace), **extra)
    pm = l1ra_model.get_l1ra_model(model, cfg)
    opt = l1ra_model.create_optimizer(pm, lr=spec.lr, weight_decay=spec.weight_decay)

    def after_step(step, opt, skipped=False):
        l1ra_model.after_optimizer_step(pm, opt, step=step, optimizer_step_skipped=skipped)

    return pm, opt, after_step


def wrap_model(method: str, model: nn.Module, task, spec):
    """PEFT/L1RA model, optimizer (None for `base`) and the per-step hook `after_step(step, opt, skipped)`."""
    import peft

    common = dict(r=spec.rank, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                  target_modules=task.target_modules, task_type=task.task_type)
    if method in ("lora", "dora", "base"):
        pm = peft.get_peft_model(model, peft.LoraConfig(use_dora=method == "dora", **common))
        if method == "base":  # untrained adapters: B = 0, so this is the base model (and its fresh head)
            return pm, None, _no_hook
        return pm, _adamw(pm, spec), _no_hook
    if method == "head_only":
        return _head_only(model, task, spec)
    if method in ("adalora", "adalora_paper"):
        return _adalora(model, spec, common)
    if method in L1RA_METHODS:
        return _l1ra(model, spec, common)
    raise ValueError(f"--methods: unknown method {method!r}; choose from {', '.join(METHODS)}")
