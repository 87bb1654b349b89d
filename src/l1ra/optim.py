"""Optimizer groups for L1RA, and in-place slot resets / seeding of optimizer state when slots are pruned or revived.

Parameters never change shape, so the optimizer keeps every parameter and state tensor object for the whole run;
pruning or reviving a slot only writes zeros into the state tensors at that slot (`reset_slot_state_`), in place:
surviving slots keep their state exactly and step counters are untouched.

State layouts handled (see `reset_slot_state_`):
- per-parameter tensors of the parameter's shape: torch Adam/AdamW (`exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`),
  SGD's `momentum_buffer`, Adagrad's `sum`, RMSprop's `square_avg` / `momentum_buffer` / `grad_avg`, bitsandbytes'
  32-bit `state1` / `state2`: the slot is zeroed, as a fresh optimizer holds it;
- bitsandbytes' 8-bit blockwise state (`state1`/`state2` uint8 with `absmax1/2` and `qmap1/2`, blocks of 256 values of
  the flattened tensor): dequantized, the slot set, re-quantized in place (values in the same block as the slot are
  re-rounded; absmax of a block can only change where the slot held the block's maximum);
- factored state (Adafactor's `row_var` / `col_var`): the factor indexed by the rank axis is zeroed at the slot; the
  other factor is shared by all slots and kept, so the slot's second-moment estimate restarts from the shared factor.

Adam-family optimizers (torch Adam/AdamW, bitsandbytes' Adam/AdamW in 32 and 8 bits, paged or not) carry one bias
correction per tensor: after a long run a zeroed slot would take first steps ~3x a fresh Adam's. `SeedHook`, a step
pre-hook, therefore seeds a revived slot's moments from its own first non-zero gradient g so that, after the step,
`m_hat = g` and `v_hat = g^2`: the first update equals a fresh AdamW's.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from .slots import fill_slots_, full, local, write_slots_

ADAPTER_GROUP, NO_DECAY_GROUP, GATE_GROUP = "l1ra_adapters", "l1ra_adapters_no_decay", "l1ra_gates"
_BNB_BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizer state: blocks of 256 values of the flattened tensor


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under wrappers such as Accelerate's `AcceleratedOptimizer`."""
    # Accelerate's AcceleratedOptimizer subclasses torch.optim.Optimizer without its state (hooks): go below it too.
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def param_groups(model: nn.Module, lr: float, weight_decay: float, gate_lr: float, gates: Iterable[nn.Parameter]):
    """Adapters (matrices with weight decay, vectors without) at `lr`; gates at `gate_lr`, no weight decay."""
    gate_ids = {id(g) for g in gates}
    decay, no_decay, gate_params = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in gate_ids:
            gate_params.append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": ADAPTER_GROUP},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": NO_DECAY_GROUP},
        {"params": gate_params, "lr": gate_lr, "weight_decay": 0.0, "name": GATE_GROUP},
    ]
    groups = [g for g in groups if g["params"]]
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_trainable, "every trainable parameter in exactly one group"
    return groups


def group_lr_of(optimizer, params: list[nn.Parameter]) -> list[Optional[float]]:
    """Current learning rate of the group holding each parameter (None if the optimizer does not hold it)."""
    lr_by_id = {}
    for group in unwrap_optimizer(optimizer).param_groups:
        for p in group["params"]:
            lr_by_id[id(p)] = group["lr"]
    return [lr_by_id.get(id(p)) for p in params]


# ------------------------------------------------------------------------------------------------ resetting slots


def _is_8bit(state: dict) -> bool:
    return any(k in state for k in ("absmax1", "absmax2")) and any(
        torch.is_tensor(state.get(k)) and state[k].dtype == torch.uint8 for k in ("state1", "state2")
    )


def _bnb_edit_(state: dict, key: str, p: torch.Tensor, dim: int, index, values: Optional[torch.Tensor]) -> None:
    """8-bit blockwise state `key` ('state1'/'state2'): dequantize, set the slots (`values`, or zero), re-quantize."""
    import bitsandbytes.functional as F

    n = key[-1]
    q, absmax, code = state[key], state[f"absmax{n}"], state[f"qmap{n}"]
    value = F.dequantize_blockwise(q, absmax=absmax, code=code, blocksize=_BNB_BLOCK).view(p.shape).float()
    if values is None:
        fill_slots_(value, dim, index, 0.0)
    else:
        write_slots_(value, dim, index, values)
    new_q, qs = F.quantize_blockwise(value.contiguous(), code=code, blocksize=_BNB_BLOCK)
    q.copy_(new_q.view_as(q))
    absmax.copy_(qs.absmax.view_as(absmax))


def _slot_indexed(value: torch.Tensor, p: torch.Tensor, dim: int) -> bool:
    """Whether a state tensor holds one entry per slot along `dim` (and 1 or p's size along every other dim)."""
    if value.ndim != p.ndim or value.shape[dim] != p.shape[dim]:
        return False
    return all(v in (1, s) for i, (v, s) in enumerate(zip(value.shape, p.shape)) if i != dim)


@torch.no_grad()
def reset_slot_state_(optimizer, p: torch.Tensor, dim: int, index) -> None:
    """Zero every optimizer-state entry of `p`'s slots `index` along `dim`, in place; keep step counters and every
    other slot's state. A no-op for a parameter without state (not stepped yet) or an optimizer that does not hold it."""
    if optimizer is None or not len(index):
        return
    opt = unwrap_optimizer(optimizer)
    state = opt.state.get(p)
    if not state:
        return
    eight_bit = _is_8bit(state)
    for key, value in state.items():
        if not torch.is_tensor(value) or value.ndim == 0 or key.startswith(("qmap", "absmax")):
            continue
        if eight_bit and key in ("state1", "state2") and value.dtype == torch.uint8:
            _bnb_edit_(state, key, p, dim, index, None)
        elif _slot_indexed(value, p, dim) and value.is_floating_point():
            fill_slots_(value, dim, index, 0.0)


# ------------------------------------------------------------------------------------ seeding revived Adam slots


def _adam_keys(opt: torch.optim.Optimizer, state: dict) -> Optional[tuple[str, str, Optional[str]]]:
    """(first moment, second moment, max second moment) keys if this is an Adam-family state, else None."""
    if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) and "exp_avg" in state and "exp_avg_sq" in state:
        return "exp_avg", "exp_avg_sq", ("max_exp_avg_sq" if "max_exp_avg_sq" in state else None)
    if getattr(opt, "optimizer_name", None) == "adam" and "state1" in state and "state2" in state:  # bitsandbytes
        return "state1", "state2", None
    return None


def _set_moment_(state: dict, key: str, p, dim: int, index, values: torch.Tensor) -> None:
    value = state[key]
    if value.dtype == torch.uint8 and _is_8bit(state):
        _bnb_edit_(state, key, p, dim, index, values)
    else:
        write_slots_(value, dim, index, values)


class SeedHook:
    """Optimizer step pre-hook: seeds the moments of revived slots from their own gradient (see the module doc).

    `pending` is the L1RA state's `{(module, tensor kind): slots}` table; `params` maps the same keys to
    `(parameter, rank dim)`. A slot stays pending while its gradient is all zero (a revived slot's A row and gate get
    no gradient until its B column has moved) or not finite (a skipped mixed-precision step)."""

    def __init__(self, l1ra_state):
        self.state = l1ra_state

    @torch.no_grad()
    def __call__(self, optimizer, args, kwargs) -> None:
        st = self.state
        if not st.pending:
            return
        scale = kwargs.get("grad_scale") if kwargs else None  # fused AdamW under GradScaler: grads are still scaled
        found_inf = kwargs.get("found_inf") if kwargs else None
        if found_inf is not None and bool(found_inf.item()):
            return
        params = st.slot_params()
        for key in list(st.pending):
            p, dim = params[key]
            left = seed_slots_(optimizer, p, dim, st.pending[key], scale)
            if left:
                st.pending[key] = left
            else:
                del st.pending[key]


def seed_slots_(optimizer, p: torch.Tensor, dim: int, slots: list[int], grad_scale=None) -> list[int]:
    """Seed Adam moments of `p`'s `slots` from the current gradient; returns the slots still waiting for one."""
    opt = unwrap_optimizer(optimizer)
    state = opt.state.get(p)
    keys = _adam_keys(opt, state) if state else None
    if keys is None:
        if not state and (p.grad is None or not bool(full(p.grad).any())):
            # No state and no gradient yet: e.g. torch.distributed.checkpoint's set_optimizer_state_dict initialises
            # the state with a zero-gradient step before loading the saved state; the slots are still waiting.
            return slots
        # Not an Adam-family state (reset already matches a fresh optimizer), or no state yet (fresh anyway).
        return []
    if p.grad is None:
        return slots
    grad = full(p.grad).float().index_select(dim, torch.tensor(slots, device=p.grad.device))
    if grad_scale is not None:
        grad = grad / grad_scale.to(grad.device).float()
    other = [d for d in range(grad.ndim) if d != dim]
    ok = torch.isfinite(grad).all(dim=other) & (grad != 0).any(dim=other) if other else torch.isfinite(grad) & (grad != 0)
    ok_list = ok.cpu().tolist()  # one host sync, only in the few steps after a reallocation
    ready = [s for s, good in zip(slots, ok_list) if good]
    if not ready:
        return slots
    grad = grad.index_select(dim, torch.tensor([i for i, good in enumerate(ok_list) if good], device=grad.device))
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    beta1, beta2 = (float(b) for b in group["betas"][:2])
    t = float(state["step"]) + 1  # the step about to be taken (Adam increments its count first)
    m = grad * (1 - beta1 ** (t - 1))  # after this step: m / (1 - beta1^t) == grad
    v = grad.square() * (1 - beta2 ** (t - 1))  # after this step: v / (1 - beta2^t) == grad^2
    first, second, peak = keys
    _set_moment_(state, first, p, dim, ready, m)
    _set_moment_(state, second, p, dim, ready, v)
    if peak is not None:
        _set_moment_(state, peak, p, dim, ready, v)
    return [s for s, good in zip(slots, ok_list) if not good]


def install_seed_hook(optimizer, l1ra_state) -> None:
    """Register the seeding pre-hook on the torch optimizer (under any wrapper), once per optimizer."""
    if optimizer is None:
        return
    opt = unwrap_optimizer(optimizer)
    if not isinstance(opt, torch.optim.Optimizer):
        return
    hooks = opt.__dict__.setdefault("_l1ra_seed_hooks", {})
    if id(l1ra_state) not in hooks:
        hooks[id(l1ra_state)] = opt.register_step_pre_hook(SeedHook(l1ra_state))


def local_gates(gates: list[torch.Tensor]) -> list[torch.Tensor]:
    """The storage the proximal step shrinks in place (a sharded gate's local shard)."""
    return [local(g) for g in gates]



@torch.no_grad()
def fit_state_to_capacity_(optimizer, l1ra_state) -> int:
    """Optimizer state saved before fixed capacity (l1ra checkpoint format 1) holds each adapter tensor at its live
    rank. Loading such a checkpoint puts the live ranks in the first slots (`checkpoint.load_into`): put their state
    there too, dead slots zero, as a fresh optimizer holds them. State already in capacity shape, or of another layout,
    is left alone. Returns the number of state tensors placed; raises `CheckpointError` for live-rank state it cannot
    place (bitsandbytes' 8-bit blocks, sharded parameters), naming the way out."""
    from .errors import CheckpointError
    from .slots import is_dtensor

    if optimizer is None:
        return 0
    opt, placed = unwrap_optimizer(optimizer), 0
    for (name, kind), (p, dim) in l1ra_state.slot_params().items():
        state = opt.state.get(p) or {}
        live = l1ra_state.live[name]
        compact = list(p.shape)
        compact[dim] = len(live)
        for key, value in list(state.items()):
            if (not torch.is_tensor(value) or value.ndim != p.ndim or key.startswith(("qmap", "absmax"))
                    or value.shape == p.shape or list(value.shape) != compact):
                continue  # capacity-shaped, or another layout (e.g. bitsandbytes' quantization maps)
            if live != list(range(len(live))) or is_dtensor(p) or _is_8bit(state) or not value.is_floating_point():
                raise CheckpointError(
                    f"optimizer state {key!r} of {name} ({kind}) has shape {tuple(value.shape)}, the parameter "
                    f"{tuple(p.shape)} ({len(live)} live of {p.shape[dim]} slots): it was saved by an l1ra before "
                    "fixed capacity (checkpoint format 1), for an optimizer whose state l1ra cannot place into the "
                    "capacity. Resume without it: delete optimizer.pt and scheduler.pt from the checkpoint folder "
                    "(the Trainer then starts a fresh optimizer), or load the adapter alone with "
                    "model.load_adapter(checkpoint, 'default')"
                )
            state[key] = value.new_zeros(p.shape).index_copy_(dim, torch.arange(len(live), device=value.device), value)
            placed += 1
    return placed
