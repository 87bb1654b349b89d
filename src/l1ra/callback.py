"""`L1RACallback`: L1RA inside `transformers.Trainer` / TRL's `SFTTrainer`, with no Trainer subclass."""

from __future__ import annotations

import warnings

import torch
from transformers import TrainerCallback

from . import distributed
from .model import after_optimizer_step, arm_gradient_capture, find_l1ra_model, gate_learning_rates, gates
from .optim import fit_state_to_capacity_, install_seed_hook, unwrap_optimizer
from .reach import lr_factors_from, unreachable_message


class L1RACallback(TrainerCallback):
    """Runs `l1ra.after_optimizer_step` once per optimizer step (never per micro-batch).

    Give the Trainer L1RA's optimizer so that the gates get their own learning rate and no weight decay::

        Trainer(model, args, optimizers=(l1ra.create_optimizer(model, lr=args.learning_rate), None),
                callbacks=[l1ra.L1RACallback()])
    """

    def __init__(self):
        self.events = []

    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        # Fired at the end of Trainer.__init__: after TRL's SFTTrainer cast a quantized model's trainable parameters
        # (the gates too) to bf16, and before train() wraps the model in DDP. Casting back here keeps DDP's gradient
        # hooks, which hang on each parameter's gradient accumulator (a later `gate.data = ...` drops them).
        if model is not None:
            restore_fp32_gates(find_l1ra_model(model), unwrap_optimizer(optimizer) if optimizer is not None else None)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        distributed.check_not_sharded(model, optimizer, args)  # FSDP / DeepSpeed: refuse before anything else
        peft_model = find_l1ra_model(model)
        peft_model.l1ra_state.config.total_steps = state.max_steps
        opt = unwrap_optimizer(optimizer)
        cast = sorted({str(g.dtype) for g in gates(peft_model).values() if g.dtype != torch.float32})
        if cast and is_quantized(peft_model) and args.world_size > 1:
            raise ValueError(
                f"l1ra: the L1RA gates are {', '.join(cast)} at train begin, and the Trainer has already wrapped the "
                f"model for its {args.world_size} processes: casting them back to float32 now would stop DDP from "
                "averaging their gradients. Pass the callback to the Trainer's constructor "
                "(Trainer(..., callbacks=[l1ra.L1RACallback()])), which restores them before the model is wrapped, "
                "or cast them back yourself before trainer.train(): "
                "for g in l1ra.gates(model).values(): g.data = g.data.float()"
            )
        restore_fp32_gates(peft_model, opt)  # one process: nothing hangs on the gates yet (callback added late)
        fit_state_to_capacity_(opt, peft_model.l1ra_state)  # a checkpoint written before fixed capacity (format 1)
        install_seed_hook(opt, peft_model.l1ra_state)  # revived slots (also those a resumed checkpoint left pending)
        arm_gradient_capture(peft_model.l1ra_state)  # new_rank_init='gradient' and a reallocation after the first step
        if state.is_world_process_zero and state.global_step == 0:
            factors = lr_factors_from(kwargs.get("lr_scheduler"), state.max_steps)
            message = unreachable_message(peft_model.l1ra_state.config, state.max_steps, factors)
            if message:
                warnings.warn(message, stacklevel=2)
        live = list(gates(peft_model).values())
        gate_learning_rates(
            peft_model, opt, fix="pass optimizers=(l1ra.create_optimizer(model, lr=args.learning_rate), None) to the Trainer"
        )
        gate_ids = {id(g) for g in live}
        shared = [
            g for g in opt.param_groups if any(id(p) in gate_ids for p in g["params"])
            and any(id(p) not in gate_ids for p in g["params"])
        ]
        if shared:
            warnings.warn(
                "l1ra: the gates share a param group with other weights, so they train at that group's lr and weight "
                "decay instead of eta_c; pass optimizers=(l1ra.create_optimizer(model, lr=...), None) to the Trainer.",
                stacklevel=2,
            )

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        # Fired right after optimizer.step() and before the lr scheduler steps and gradients are zeroed;
        # state.global_step still counts the steps before this one.
        event = after_optimizer_step(model, optimizer, step=state.global_step + 1)
        if event is not None:
            self.events.append(event)


def restore_fp32_gates(peft_model, optimizer) -> None:
    """TRL's SFTTrainer casts every trainable parameter of a quantized model to bf16 (QLoRA's recommendation for the
    LoRA factors). The gates must stay fp32, or the L1's small proximal steps round away: cast them back, with any
    optimizer state already loaded for them. Elsewhere a cast gate is still refused (see `check_gate_dtype`)."""
    if not is_quantized(peft_model):
        return
    for gate in gates(peft_model).values():
        if gate.dtype == torch.float32:
            continue
        gate.data = gate.data.float()
        state = optimizer.state.get(gate, {}) if optimizer is not None else {}
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point() and key != "step":
                state[key] = value.float()



def is_quantized(peft_model) -> bool:
    base = peft_model.get_base_model()
    return bool(getattr(base, "is_quantized", False) or getattr(base, "hf_quantizer", None) is not None)
