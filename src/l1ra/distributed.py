"""L1RA under several processes: DistributedDataParallel (DDP) support, and refusal of sharded training.

Reallocation changes parameter shapes, so a DDP wrapper that was built before it reduces the old parameters: the new
ranks would get no gradient all-reduce and the processes would drift apart silently. L1RA therefore

* finds the wrapper explicitly: the plain loop passes it (`after_optimizer_step(ddp_model, optimizer)`), and every L1RA
  model carries a forward pre-hook that records the DDP wrapper that is running it (DDP marks itself as the active
  module during its forward). That covers `Trainer`/Accelerate, whose callbacks only see the unwrapped model;
* makes every process take the same decision: the gate values that drive the plan are broadcast from rank 0 of the
  wrapper's process group (gates are identical anyway, since DDP averages gradients; the broadcast makes it a
  guarantee), and new ranks are drawn from a CPU generator seeded by (seed, reallocation count);
* rebuilds the wrapper in place after a reallocation, the way DDP's own `__setstate__` does: drop the old reducer's
  autograd hooks, rebuild the parameter list, verify that every process holds the same shapes, build a new reducer,
  then re-register Python comm hooks and the static-graph setting.

This uses private DDP methods (`_build_params_for_reducer`, `_build_debug_param_to_name_mapping`, `_ddp_init_helper`,
`reducer._remove_autograd_hooks`, `_verify_param_shape_across_processes`). `check_ddp_internals()` verifies they exist
with the expected signatures and raises a clear error otherwise; tested with torch 2.13.

FSDP and DeepSpeed shard parameters (FSDP, ZeRO-3) or keep flat copies of them in the optimizer (ZeRO-1/2), so a
parameter cannot change shape under them: `check_not_sharded` refuses them at start-up and says to use DDP.
"""

from __future__ import annotations

import inspect
import os
import warnings
import weakref
from typing import Optional

import torch
from torch import nn

_WRAPPERS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()

# DDP constructor options that change how the reducer is built and that a rebuild cannot reproduce.
_INIT_HELPER_ARGS = ["self", "parameters", "expect_sparse_gradient", "param_to_name_mapping", "static_graph"]


class DistributedSetupError(RuntimeError):
    """L1RA cannot run under this distributed setup; the message says why and what to use instead."""


def _ddp_class():
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel


def check_ddp_internals() -> None:
    """Raise `DistributedSetupError` if this torch lacks the private DDP methods the rebuild relies on."""
    ddp = _ddp_class()
    missing = [
        name
        for name in ("_build_params_for_reducer", "_build_debug_param_to_name_mapping", "_ddp_init_helper")
        if not callable(getattr(ddp, name, None))
    ]
    if not missing:
        params = list(inspect.signature(ddp._ddp_init_helper).parameters)
        if params != _INIT_HELPER_ARGS:
            missing.append(f"_ddp_init_helper{tuple(params[1:])} (expected {tuple(_INIT_HELPER_ARGS[1:])})")
    import torch.distributed.utils as dist_utils

    if not callable(getattr(dist_utils, "_verify_param_shape_across_processes", None)):
        missing.append("torch.distributed.utils._verify_param_shape_across_processes")
    if not hasattr(ddp, "_active_ddp_module"):
        missing.append("DistributedDataParallel._active_ddp_module")
    if missing:
        raise DistributedSetupError(
            f"l1ra rebuilds DistributedDataParallel after a rank reallocation with private torch APIs that torch "
            f"{torch.__version__} does not have as expected: {', '.join(missing)}. l1ra is tested with torch 2.13; "
            "install a tested torch, or train on one process."
        )


# ---------------------------------------------------------------------------------------------------------------
# Finding the DDP wrapper of an L1RA model


def _chain(module: nn.Module):
    """`module` and the modules it wraps (`.module`, `._orig_mod`), outermost first."""
    current = module
    for _ in range(16):
        yield current
        inner = current._modules.get("module") or current._modules.get("_orig_mod")
        if inner is None:
            return
        current = inner


class DDPWatch:
    """Forward pre-hook on the L1RA model: remember the DDP wrapper that is running it. Picklable."""

    def __call__(self, module: nn.Module, args) -> None:
        ddp = getattr(_ddp_class(), "_active_ddp_module", None)
        if ddp is None:
            return
        known = _WRAPPERS.get(module)
        if known is not None and known() is ddp:
            return
        if any(m is module for m in _chain(ddp)):
            register_ddp(module, ddp)


def watch(peft_model: nn.Module) -> None:
    """Install the DDP-finding pre-hook on an L1RA model (once)."""
    if not any(isinstance(h, DDPWatch) for h in peft_model._forward_pre_hooks.values()):
        peft_model.register_forward_pre_hook(DDPWatch())


def register_ddp(peft_model: nn.Module, ddp: nn.Module) -> None:
    check_ddp_internals()
    _check_rebuildable(ddp)
    _WRAPPERS[peft_model] = weakref.ref(ddp)


def ddp_wrapper(model: nn.Module, peft_model: nn.Module) -> Optional[nn.Module]:
    """The DDP wrapper around `peft_model`: `model` itself (or a wrapper inside it) if it is one, else the last
    wrapper seen running the model's forward. None when the model is not trained with DDP."""
    ddp_cls = _ddp_class()
    for m in _chain(model):
        if isinstance(m, ddp_cls):
            register_ddp(peft_model, m)
            return m
    ref = _WRAPPERS.get(peft_model)
    ddp = ref() if ref is not None else None
    if ddp is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None  # the process group is gone: a later single-process use of the same model
    return ddp


def _check_rebuildable(ddp) -> None:
    unsupported = []
    if getattr(ddp, "_use_python_reducer", False):
        unsupported.append("the compiled-autograd Python reducer (torch._dynamo optimize_ddp='python_reducer')")
    if getattr(ddp, "mixed_precision", None) is not None:
        unsupported.append("DDP's native mixed_precision (use torch.autocast / Trainer bf16=True instead)")
    if getattr(ddp, "_delay_all_reduce_params", None):
        unsupported.append("delay_all_reduce_named_params")
    if unsupported:
        raise DistributedSetupError(
            "l1ra cannot rebuild this DistributedDataParallel after a rank reallocation because it uses "
            + "; ".join(unsupported)
            + ". Build the wrapper without these options."
        )


# ---------------------------------------------------------------------------------------------------------------
# Agreeing on a plan, rebuilding the wrapper


@torch.no_grad()
def agree_on_gates(live_gates: list[torch.Tensor], flat: torch.Tensor, ddp) -> torch.Tensor:
    """Broadcast the gate values from rank 0 of the wrapper's group, write them into the local gates if they differ,
    and return them: every process then plans the same reallocation from the same numbers."""
    import torch.distributed as dist

    group = ddp.process_group
    if dist.get_world_size(group) == 1:
        return flat
    device = live_gates[0].device if dist.get_backend(group) != "gloo" else torch.device("cpu")
    buf = flat.to(device=device, dtype=torch.float64 if flat.dtype == torch.float64 else torch.float32).clone()
    dist.broadcast(buf, src=dist.get_global_rank(group, 0), group=group)
    agreed = buf.cpu().to(flat.dtype)
    if not torch.equal(agreed, flat):
        warnings.warn(
            f"l1ra: gates differed between processes (max difference {float((agreed - flat).abs().max()):.3g}); "
            "using rank 0's values for the reallocation.",
            stacklevel=3,
        )
        for gate, value in zip(live_gates, torch.split(agreed, [g.numel() for g in live_gates])):
            gate.copy_(value.to(device=gate.device, dtype=gate.dtype))
    return agreed


def rebuild_ddp(ddp) -> None:
    """Make `ddp` reduce the model's current parameters (after shapes changed), keeping its settings.

    Must run between iterations (after `optimizer.step()`, before the next forward), on every process.
    """
    import torch.distributed as dist

    check_ddp_internals()
    _check_rebuildable(ddp)
    old = getattr(ddp, "reducer", None)
    if old is not None:
        old._remove_autograd_hooks()  # unchanged parameters would otherwise fire both reducers
    ignore = ddp.parameters_to_ignore
    ddp._module_parameters = [p for n, p in ddp.module.named_parameters() if n not in ignore]
    parameters, expect_sparse_gradient = ddp._build_params_for_reducer()
    from torch.distributed.utils import _verify_param_shape_across_processes

    _verify_param_shape_across_processes(ddp.process_group, parameters)  # same shapes on every process, or raise
    param_to_name_mapping = ddp._build_debug_param_to_name_mapping(parameters)
    ddp.reducer = None
    ddp._ddp_init_helper(parameters, expect_sparse_gradient, param_to_name_mapping, ddp.static_graph)
    ddp._has_rebuilt_buckets = False
    for hook, state in getattr(ddp, "_comm_hooks", []):
        ddp.logger._set_comm_hook_name(hook.__qualname__)
        dist._register_comm_hook(ddp.reducer, state, hook)
    if ddp.static_graph:
        ddp._static_graph_delay_allreduce_enqueued = False
        ddp.reducer._set_static_graph()
        ddp.logger._set_static_graph()


# ---------------------------------------------------------------------------------------------------------------
# Sharded training: refuse


_SHARDED_HELP = (
    "L1RA changes the shape of LoRA parameters when it reallocates ranks, and {what} Use DistributedDataParallel "
    "instead (plain `torchrun`/`accelerate launch` without an FSDP or DeepSpeed config): LoRA adapters are small, so "
    "replicating them costs little; the base model can be quantized to save memory."
)
_FSDP_WHY = "FSDP flattens and shards parameters across processes, so their shapes are fixed when it wraps the model."
_DS_WHY = (
    "DeepSpeed ZeRO-3 shards parameters across processes, and ZeRO-1/2 keep flattened copies of them in the "
    "optimizer; neither can follow a shape change (l1ra is not tested with DeepSpeed)."
)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def check_not_sharded(model: Optional[nn.Module] = None, optimizer=None, args=None) -> None:
    """Raise `DistributedSetupError` if the run uses FSDP or DeepSpeed (from Trainer args, Accelerate's environment,
    the model's wrappers/parameters or the optimizer)."""
    fsdp = deepspeed = None
    if args is not None:
        if getattr(args, "fsdp", None):
            fsdp = f"TrainingArguments.fsdp={args.fsdp!r}"
        if getattr(args, "deepspeed", None):
            deepspeed = "TrainingArguments.deepspeed is set"
    if _env_true("ACCELERATE_USE_FSDP"):
        fsdp = fsdp or "ACCELERATE_USE_FSDP=true (an `accelerate launch` FSDP config)"
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        deepspeed = deepspeed or "ACCELERATE_USE_DEEPSPEED=true (an `accelerate launch` DeepSpeed config)"
    if model is not None and fsdp is None and deepspeed is None:
        fsdp_types = _fsdp_types()
        for m in model.modules():
            if fsdp_types and isinstance(m, fsdp_types):
                fsdp = f"the model contains {type(m).__name__}"
                break
            if type(m).__name__ == "DeepSpeedEngine":
                deepspeed = "the model is wrapped in a DeepSpeedEngine"
                break
        else:
            for name, p in model.named_parameters():
                if hasattr(p, "ds_id") or hasattr(p, "ds_numel"):
                    deepspeed = f"parameter {name} is partitioned by DeepSpeed ZeRO-3"
                    break
                if type(p.data).__name__ == "DTensor" or type(p).__name__ == "DTensor":
                    fsdp = f"parameter {name} is a sharded DTensor (FSDP2 / tensor parallel)"
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
    if fsdp:
        raise DistributedSetupError(f"l1ra does not support FSDP ({fsdp}). " + _SHARDED_HELP.format(what=_FSDP_WHY))
    if deepspeed:
        raise DistributedSetupError(
            f"l1ra does not support DeepSpeed ({deepspeed}). " + _SHARDED_HELP.format(what=_DS_WHY)
        )


def _fsdp_types() -> tuple:
    types = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        types.append(FullyShardedDataParallel)
    except ImportError:  # pragma: no cover
        pass
    try:
        from torch.distributed.fsdp import FSDPModule

        types.append(FSDPModule)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)
