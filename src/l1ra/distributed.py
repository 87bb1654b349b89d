"""L1RA under several processes: every process takes the same decision; sharded training is refused (for now).

Adapters have fixed shapes (see `l1ra.resize`): a reallocation writes values in place, so a DistributedDataParallel
wrapper, its reducer, buckets and comm hooks stay valid and nothing is rebuilt. What several processes need is the
same decision everywhere: `agree_from_rank0` broadcasts the gate values and the sensitivity sums that drive the plan
from rank 0 over the default process group (identical anyway, since DDP averages gradients; the broadcast makes it
a guarantee), and new ranks are drawn from a CPU generator seeded by (seed, reallocation count).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn


class DistributedSetupError(RuntimeError):
    """L1RA cannot run under this distributed setup; the message says why and what to use instead."""


def gather_flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One flat CPU float32 vector from tensors that may sit on different devices (a model spread with
    device_map='auto') and have different dtypes: each is moved to the first tensor's device, then one copy to the
    host (a single device sync when they share a device)."""
    if not tensors:
        return torch.zeros(0)
    device = tensors[0].device
    parts = [t.detach().reshape(-1).to(device=device, dtype=torch.float32) for t in tensors]
    return torch.cat(parts).cpu()


def _world() -> int:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def _broadcast_device(first: Optional[torch.device] = None) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return first or torch.device("cpu")


@torch.no_grad()
def agree_from_rank0(
    flat: torch.Tensor, sensitivity: Optional[torch.Tensor] = None, device: Optional[torch.device] = None
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`flat` (the gate values) and `sensitivity` as rank 0 of the default process group holds them: broadcast when
    torch.distributed is initialized with more than one process (gloo: CPU buffers; nccl: on the current CUDA
    device), returned unchanged otherwise. Both are flat CPU fp32 vectors; `sensitivity` is None on every process
    or on none."""
    if _world() == 1:
        return flat, sensitivity
    import torch.distributed as dist

    n = flat.numel()
    buf = torch.cat([flat.float(), sensitivity.float()]) if sensitivity is not None else flat.float()
    buf = buf.to(_broadcast_device(device)).contiguous()
    dist.broadcast(buf, src=0)
    buf = buf.cpu()
    return buf[:n].clone(), (buf[n:].clone() if sensitivity is not None else None)


@torch.no_grad()
def all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor summed over the processes of the default group (one collective on a flat fp32 buffer), returned
    on the CPU; unchanged (on the CPU) with one process."""
    if _world() == 1:
        return [t.detach().float().cpu() for t in tensors]
    import torch.distributed as dist

    device = _broadcast_device(tensors[0].device if tensors else None)
    buf = torch.cat([t.detach().reshape(-1).to(device, torch.float32) for t in tensors]).contiguous()
    dist.all_reduce(buf)
    buf = buf.cpu()
    return [part.view(t.shape).clone() for part, t in zip(torch.split(buf, [t.numel() for t in tensors]), tensors)]


@torch.no_grad()
def from_rank0(t: torch.Tensor) -> torch.Tensor:
    """`t` (a CPU tensor of the same shape on every process) as rank 0 holds it."""
    if _world() == 1:
        return t
    import torch.distributed as dist

    buf = t.detach().float().to(_broadcast_device()).contiguous()
    dist.broadcast(buf, src=0)
    return buf.cpu().to(t.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Sharded training: refuse


_FSDP_WHY = (
    "FSDP1 flattens parameters into flat buffers; l1ra writes rank slots through FSDP2's per-parameter DTensors only."
)
_DS_WHY = (
    "ZeRO-1/2 keep flat fp32 master partitions of the trainable parameters and their optimizer state, and ZeRO-3 also "
    "partitions the parameters, so l1ra's in-place slot writes (pruning, reviving, the proximal step) would have to go "
    "through deepspeed.utils.safe_set_full_fp32_param / safe_set_full_optimizer_state, which l1ra does not do yet. "
    "Use FSDP2 (torch.distributed.fsdp.fully_shard, or TrainingArguments(fsdp='full_shard', fsdp_config={'version': "
    "2})) to shard, or DistributedDataParallel: LoRA adapters are small, so replicating them costs little."
)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def check_not_sharded(model: Optional[nn.Module] = None, optimizer=None, args=None) -> None:
    """Raise `DistributedSetupError` if the run uses FSDP or DeepSpeed (from Trainer args, Accelerate's environment,
    the model's wrappers/parameters or the optimizer)."""
    fsdp = deepspeed = None
    if args is not None:
        if getattr(args, "fsdp", None) and _trainer_fsdp_version(args) != 2:
            fsdp = f"TrainingArguments.fsdp={args.fsdp!r} with fsdp_config version {_trainer_fsdp_version(args)}"
        if getattr(args, "deepspeed", None):
            deepspeed = "TrainingArguments.deepspeed is set"
    # `accelerate launch` sets FSDP_VERSION (1 unless the config says 2); an Accelerator built with an fsdp_plugin sets
    # only ACCELERATE_USE_FSDP, and an FSDP1 wrapper is then caught on the model below.
    version = os.environ.get("FSDP_VERSION", "").strip()
    if _env_true("ACCELERATE_USE_FSDP") and version not in ("", "2"):
        fsdp = fsdp or f"ACCELERATE_USE_FSDP=true with FSDP_VERSION={version} (an `accelerate launch` FSDP1 config)"
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        deepspeed = deepspeed or "ACCELERATE_USE_DEEPSPEED=true (an `accelerate launch` DeepSpeed config)"
    if model is not None and fsdp is None and deepspeed is None:
        fsdp1 = _fsdp1_type()
        for m in model.modules():
            if fsdp1 is not None and isinstance(m, fsdp1):
                fsdp = f"the model contains {type(m).__name__} (FSDP1)"
                break
            if type(m).__name__ == "DeepSpeedEngine":
                deepspeed = "the model is wrapped in a DeepSpeedEngine"
                break
        else:
            for name, p in model.named_parameters():
                if hasattr(p, "ds_id") or hasattr(p, "ds_numel"):
                    deepspeed = f"parameter {name} is partitioned by DeepSpeed ZeRO-3"
                    break
    if optimizer is not None and deepspeed is None:
        opt = optimizer
        for _ in range(8):
            if type(opt).__module__.split(".")[0] == "deepspeed":
                deepspeed = f"the optimizer is DeepSpeed's {type(opt).__name__}"
                break
            if not hasattr(opt, "optimizer"):
                break
            opt = opt.optimizer
    if model is not None and fsdp is None and deepspeed is None:
        from .sharded import check_consistently_sharded

        check_consistently_sharded(model)
    if fsdp:
        raise DistributedSetupError(
            f"l1ra does not support FSDP1 ({fsdp}). Use FSDP2: torch.distributed.fsdp.fully_shard, or "
            "fsdp_config={'version': 2} in TrainingArguments / fsdp_version: 2 in the accelerate config. " + _FSDP_WHY
        )
    if deepspeed:
        raise DistributedSetupError(
            f"l1ra does not support DeepSpeed ({deepspeed}). " + _DS_WHY
        )


def _fsdp1_type():
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return None
    return FullyShardedDataParallel


def _trainer_fsdp_version(args) -> int:
    config = getattr(args, "fsdp_config", None) or {}
    return int(config.get("version", config.get("fsdp_version", 2)))