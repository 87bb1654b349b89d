"""The training step of every method, its learning-rate schedule, and where and in which precision it runs.

Device: the model, every batch and the autocast go to the run's device. The precision is `l1ra.app.devices`'s, the
same decision as `l1ra train`'s: CUDA with bf16 where the GPU supports it, else fp16 with a gradient scaler; CPU with
bf16 autocast where the task asks for it and the CPU has native bf16 (fp32 otherwise: emulated bf16 is slower);
MPS in fp32. Evaluation runs on the same device with the same autocast.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import torch

from .. import devices
from ..errors import UserError
from .lm import to_device


class DeviceError(UserError, ValueError):
    """`--device` names no device, or one this machine does not have."""


def resolve_device(
    requested: str = "auto",
    *,
    low_precision: bool = True,
    cuda_available: Optional[bool] = None,
    mps_available: Optional[bool] = None,
    cuda_bf16: Optional[bool] = None,
    cpu_bf16: Optional[bool] = None,
) -> tuple[str, Optional[torch.dtype]]:
    """(device, autocast dtype or None) for `--device requested`: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N
    or mps; low precision only where the task asks for it (`low_precision`). The availability flags default to what
    this machine has; tests pass them to check every branch."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if mps_available is None:
        mps_available = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    requested = (requested or "auto").lower()
    kind, _, index = requested.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and not (kind == "cuda" and index.isdigit())):
        raise DeviceError(f"--device {requested!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if kind == "auto":
        device = "cuda" if cuda_available else "mps" if mps_available else "cpu"
    elif (kind == "cuda" and not cuda_available) or (kind == "mps" and not mps_available):
        raise DeviceError(f"--device {requested}: this machine has no {kind.upper()} device; use --device auto or cpu")
    else:
        device = requested
    kind = device.split(":")[0]
    if kind == "cuda" and cuda_bf16 is None:
        cuda_bf16 = devices.cuda_bf16_native()  # as `l1ra train`: emulated bf16 (T4, V100) is slower than fp16
    if kind == "cpu" and cpu_bf16 is None:
        cpu_bf16 = devices.cpu_bf16_native()
    plan = devices.plan_device(cuda=kind == "cuda", mps=kind == "mps", cuda_bf16=bool(cuda_bf16),
                               bf16=None if low_precision else False, cpu_bf16_default=low_precision,
                               cpu_bf16_native=bool(cpu_bf16))
    return device, torch.bfloat16 if plan.bf16 else torch.float16 if plan.fp16 else None


def sync(device: str) -> None:
    """Wait for queued GPU work, so that a wall-clock step time is the step's."""
    kind = device.split(":")[0]
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


class Precision:
    """Where a run trains and in which precision: one object so that the training step and the evaluation agree."""

    def __init__(self, device: str, amp_dtype: Optional[torch.dtype]):
        self.device, self.amp_dtype = device, amp_dtype
        self.type = device.split(":")[0]
        # fp16 needs loss scaling (its range is too small for gradients); bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(self.type) if amp_dtype == torch.float16 else None

    def autocast(self):
        return torch.autocast(self.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def describe(self) -> str:
        if self.amp_dtype is None:
            return f"{self.device}, fp32"
        dtype = str(self.amp_dtype).replace("torch.", "")
        return f"{self.device}, {dtype} autocast" + (" with loss scaling" if self.scaler else "")


def make_precision(spec, task) -> Precision:
    return Precision(*resolve_device(spec.device, low_precision=task.bf16_autocast))


def lr_lambda(steps: int, warmup_ratio: float):
    """Linear warm-up over `warmup_ratio` of the steps, then cosine decay to 0: the schedule of every method."""
    warmup = max(1, round(warmup_ratio * steps)) if warmup_ratio > 0 else 0

    def f(step: int) -> float:  # step: optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def train_step(pm, opt, sched, after_step, batch, step, max_grad_norm, prec: Precision) -> tuple[float, float]:
    """One optimizer step, identical for every method: (wall seconds, loss). `batch` is on the CPU."""
    sync(prec.device)
    t0 = time.perf_counter()
    batch = to_device(batch, prec.device)
    with prec.autocast():
        loss = pm(**batch).loss
    params = [p for g in opt.param_groups for p in g["params"]]
    skipped = False
    if prec.scaler is not None:
        prec.scaler.scale(loss).backward()
        prec.scaler.unscale_(opt)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        scale = prec.scaler.get_scale()
        prec.scaler.step(opt)
        prec.scaler.update()
        skipped = prec.scaler.get_scale() < scale  # the scaler skipped a step with inf/nan gradients
    else:
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
    after_step(step, opt, skipped)
    sched.step()
    opt.zero_grad(set_to_none=True)
    value = float(loss.detach())  # a host sync: the step's GPU work is done
    sync(prec.device)
    return time.perf_counter() - t0, value
