"""Was the optimizer step just taken skipped by a mixed-precision `GradScaler` (fp16 overflow)? Answered on the device,
without a host sync, so that the proximal L1 step and the sensitivity sums can be made conditional on it.

Accelerate's `AcceleratedOptimizer.step_was_skipped` is only right for optimizers that `GradScaler.step` does not call
on an overflow. Fused optimizers (`fused=True`, transformers' default AdamW on torch >= 2.8) declare
`_step_supports_amp_scaling`: the scaler always calls their `step()` and the kernel skips the update itself, so the
wrapper's flag stays False. The scaler itself knows, in two places:

* before `scaler.update()`: its per-optimizer `found_inf_per_device` tensors for this step (a plain loop that calls
  `after_optimizer_step` between `scaler.step(optimizer)` and `scaler.update()`);
* after `scaler.update()` (Accelerate's `optimizer.step()` runs both): the scale. `update()` multiplies it by
  `backoff_factor` (< 1) exactly when a step found an inf/NaN, and otherwise keeps it or multiplies it by
  `growth_factor` (> 1). So the step was skipped iff the scale went down. The scale before the first step is the
  scaler's initial scale (`GradScaler.load_state_dict` resets it to the loaded one); after that, the one seen last.

Reads the private `GradScaler` fields `_per_optimizer_states`, `_scale` and `_init_scale` (torch 2.13).
"""

from __future__ import annotations

import weakref
from typing import Optional, Union

import torch

from .optim import unwrap_optimizer

# scaler -> its scale after the last step that `step_skipped` saw (a 0-dim tensor on the scaler's device)
_SEEN_SCALE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def step_skipped(optimizer, scaler=None) -> Union[bool, torch.Tensor]:
    """Whether the step just taken by `optimizer` was skipped: a Python bool where that is known on the host, else a
    0-dim bool tensor on the scaler's device. `scaler`: the `GradScaler` that stepped the optimizer (default:
    Accelerate's, `optimizer.scaler`). Call once per optimizer step."""
    if getattr(optimizer, "step_was_skipped", False):
        return True
    if scaler is None:
        scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not scaler.is_enabled() or getattr(scaler, "_scale", None) is None:
        return False  # no scaler, or one that never scaled a loss: no step can have been skipped for an overflow
    scale = scaler._scale
    state = scaler._per_optimizer_states.get(id(unwrap_optimizer(optimizer)))  # .get: a defaultdict, do not add
    found = state.get("found_inf_per_device") if state else None
    if found:  # scaler.update() has not run yet: this step's own inf checks
        return torch.stack([t.to(scale.device, non_blocking=True) for t in found.values()]).sum() > 0
    previous = _SEEN_SCALE.get(scaler)
    if previous is None:
        previous = torch.full_like(scale, float(scaler._init_scale))
    _SEEN_SCALE[scaler] = scale.detach().clone()
    return scale < previous


def kept_factor(skipped: Union[bool, torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """`1 - skipped` as a 0-dim fp32 tensor on `device` (None when `skipped` is a host bool)."""
    if isinstance(skipped, bool):
        return None
    # non_blocking only towards an accelerator: a host tensor filled asynchronously could be read too early
    return (~skipped).to(device=device, dtype=torch.float32, non_blocking=device.type != "cpu")
