"""L1RA under the wrappers and precisions that LLM training uses on GPUs, tested on a CPU through the decisions the
code takes: fp16 GradScaler skips with fused optimizers (issue 20 item 2), DataParallel replicas (item 3) and gates
restored to fp32 before DDP wraps the model (item 1, with real gloo processes in tests/integration/test_ddp.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import l1ra
from conftest import make_batch, make_model
from syncs import no_host_sync


def _model(**overrides):
    values = dict(r=4, target_modules="all-linear", task_type="CAUSAL_LM", receiver_signal="sensitivity",
                  update_every=10**6, l1ra_lambda=1.0, eta_c=0.1)
    values.update(overrides)
    model = l1ra.get_l1ra_model(make_model("llama"), l1ra.L1RAConfig(**values))
    return model.train()


def _gates(model):
    return [g.detach().clone() for g in l1ra.gates(model).values()]


def _backward(model, scaler, batch, overflow: bool):
    scaler.scale(model(**batch).loss).backward()
    if overflow:
        next(iter(l1ra.gates(model).values())).grad[0] = float("inf")


# ---------------------------------------------------------------------------------------------------------------
# Item 2: a step that the GradScaler skips leaves the gates and the sensitivity sums alone, also with fused optimizers


def _accelerated(fused: bool):
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)  # sets up the state AcceleratedOptimizer reads; a CPU Accelerator makes no scaler itself
    model = _model()
    opt = l1ra.create_optimizer(model, lr=1e-2, fused=fused, foreach=None if fused else True)
    scaler = torch.amp.GradScaler("cpu")
    return model, AcceleratedOptimizer(opt, scaler=scaler), scaler


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_accelerate_fp16_skipped_step_leaves_gates_and_sensitivity_alone(fused):
    model, opt, scaler = _accelerated(fused)
    assert getattr(opt.optimizer, "_step_supports_amp_scaling", False) == fused
    batch = make_batch("llama")
    moved = []
    for overflow in (False, True, False, True):
        _backward(model, scaler, batch, overflow)
        before, scale = _gates(model), scaler.get_scale()
        opt.step()
        assert (scaler.get_scale() < scale) == overflow  # the scaler did see the overflow
        if fused:
            assert not opt.step_was_skipped  # what Accelerate reports for a fused optimizer: the reason for item 2
        l1ra.after_optimizer_step(model, opt)
        moved.append(max((a - b).abs().max().item() for a, b in zip(_gates(model), before)))
        assert torch.isfinite(model.l1ra_state.sensitivity).all()
        opt.zero_grad()
    assert moved[0] > 0 and moved[2] > 0, "a step that was taken shrinks the gates"
    assert moved[1] == 0 and moved[3] == 0, "a skipped step must not move the gates"


@pytest.mark.parametrize("before_update", [True, False], ids=["before-update", "after-update"])
def test_plain_loop_with_a_scaler_detects_the_skip_without_a_host_sync(before_update):
    model = _model()
    opt = l1ra.create_optimizer(model, lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    batch = make_batch("llama")
    for overflow in (False, True, False):
        _backward(model, scaler, batch, overflow)
        before = _gates(model)
        scaler.step(opt)
        if not before_update:
            scaler.update()
        with no_host_sync():
            l1ra.after_optimizer_step(model, opt, scaler=scaler)
        if before_update:
            scaler.update()
        moved = max((a - b).abs().max().item() for a, b in zip(_gates(model), before))
        assert (moved == 0) == overflow
        assert torch.isfinite(model.l1ra_state.sensitivity).all()
        opt.zero_grad()


def test_explicit_skip_flag_still_wins():
    model = _model(receiver_signal="min_gate")
    opt = l1ra.create_optimizer(model, lr=1e-2)
    before = _gates(model)
    l1ra.after_optimizer_step(model, opt, optimizer_step_skipped=True)
    assert all(torch.equal(a, b) for a, b in zip(_gates(model), before))
    l1ra.after_optimizer_step(model, opt, optimizer_step_skipped=False)
    # every live gate shrank (dead capacity slots sit at 0 and stay there)
    assert all(((a < b) | (b == 0)).all() and (a < b).any() for a, b in zip(_gates(model), before))


# ---------------------------------------------------------------------------------------------------------------
# Item 3: nn.DataParallel replicas (torch.nn.parallel.replicate needs CUDA devices, so the replica is built the same
# way here: `_replicate_for_data_parallel` copies of every module, whose parameters are differentiable copies)


def _replicate(module: nn.Module, to) -> nn.Module:
    modules = list(module.modules())
    copies = {m: m._replicate_for_data_parallel() for m in modules}
    for m in modules:
        replica = copies[m]
        for key, child in m._modules.items():
            replica._modules[key] = None if child is None else copies[child]
        for key, param in m._parameters.items():
            setattr(replica, key, None if param is None else to(param))
        for key, buf in m._buffers.items():
            replica._buffers[key] = None if buf is None else to(buf)
    return copies[module]


def test_a_replica_on_another_device_runs_the_gate_there():
    model = _model()
    name, layer = model.l1ra_state.layers[0]
    replica = _replicate(layer, lambda t: t.to("meta"))  # "another GPU": any tensor left on the CPU fails there
    x = torch.randn(3, layer.in_features)
    out = replica(x.to("meta"))
    assert out.device.type == "meta" and out.shape == layer(x).shape


def test_a_replica_trains_the_original_gate_like_the_model_itself():
    model = _model()
    with torch.no_grad():
        for g in l1ra.gates(model).values():
            g.uniform_(0.2, 1.0)
        for _, layer in model.l1ra_state.layers:
            layer.lora_B["default"].weight.normal_()
    batch = make_batch("llama")
    model(**batch).loss.backward()
    expected = [g.grad.clone() for g in l1ra.gates(model).values()]
    model.zero_grad(set_to_none=True)
    replica = _replicate(model, lambda t: t * 1)  # non-leaf copies, as Broadcast makes them
    replica(**batch).loss.backward()
    for g, want in zip(l1ra.gates(model).values(), expected):
        torch.testing.assert_close(g.grad, want)


# ---------------------------------------------------------------------------------------------------------------
# Item 1: gates that TRL cast to bf16 are restored when the Trainer is built, before DDP wraps the model (the
# two-process run is test_gates_cast_before_the_trainer_are_restored_before_ddp_wraps_them in
# tests/integration/test_ddp.py)


def _cast_like_trl(model):
    from types import SimpleNamespace

    model.get_base_model().hf_quantizer = SimpleNamespace(is_trainable=True, is_qat_trainable=False)
    for gate in l1ra.gates(model).values():
        gate.data = gate.data.to(torch.bfloat16)


def _trainer(model, callbacks, out):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    data = [{k: v[0] for k, v in make_batch("llama", batch=1, seed=i).items()} for i in range(4)]
    return Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks,
                   optimizers=(l1ra.create_optimizer(model, lr=1e-2), None))


def test_the_trainer_constructor_restores_fp32_gates(tmp_path):
    model = _model()
    _cast_like_trl(model)
    gate_objects = list(l1ra.gates(model).values())
    trainer = _trainer(model, [l1ra.L1RACallback()], tmp_path)
    assert all(g.dtype == torch.float32 for g in l1ra.gates(model).values())
    assert all(a is b for a, b in zip(l1ra.gates(model).values(), gate_objects))  # same Parameter objects
    trainer.train()


def test_gates_still_cast_at_train_begin_under_several_processes_are_refused():
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    model = _model()
    _cast_like_trl(model)
    args = SimpleNamespace(world_size=2, fsdp=None, deepspeed=None)
    with pytest.raises(ValueError, match=r"bfloat16 at train begin.*callbacks=\[l1ra.L1RACallback\(\)\]"):
        l1ra.L1RACallback().on_train_begin(args, TrainerState(max_steps=4), TrainerControl(), model=model,
                                           optimizer=l1ra.create_optimizer(model, lr=1e-2))
    args.world_size = 1  # one process (a callback added after the constructor): restored, nothing hangs on them yet
    l1ra.L1RACallback().on_train_begin(args, TrainerState(max_steps=4), TrainerControl(), model=model,
                                       optimizer=l1ra.create_optimizer(model, lr=1e-2))
    assert all(g.dtype == torch.float32 for g in l1ra.gates(model).values())


# ---------------------------------------------------------------------------------------------------------------
# On a CUDA GPU: the same skip detection with CUDA's GradScaler and a fused AdamW, with no host sync


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_fused_adamw_skip_is_detected_without_a_sync():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator()
    model = _model().cuda()
    opt = AcceleratedOptimizer(l1ra.create_optimizer(model, lr=1e-2, fused=True),
                               scaler=torch.amp.GradScaler("cuda"))
    batch = {k: v.cuda() for k, v in make_batch("llama").items()}
    for overflow in (False, True, False):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(**batch).loss
        opt.scaler.scale(loss).backward()
        if overflow:
            next(iter(l1ra.gates(model).values())).grad[0] = float("inf")
        before = _gates(model)
        opt.step()
        with no_host_sync():
            l1ra.after_optimizer_step(model, opt)
        moved = max((a - b).abs().max().item() for a, b in zip(_gates(model), before))
        assert (moved == 0) == overflow
        assert torch.isfinite(model.l1ra_state.sensitivity).all()
        opt.zero_grad()
