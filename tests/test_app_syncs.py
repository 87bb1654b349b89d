"""The application's training path on the device: the non-finite guard follows the parameters a reallocation creates
and reads its flag only where the Trainer syncs anyway (issue 20 item 5), and the LM loss makes no host sync
(item 9)."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import l1ra
from conftest import make_batch, make_model
from syncs import no_host_sync


def _l1ra_llama(**overrides):
    values = dict(r=4, target_modules="all-linear", task_type="CAUSAL_LM", update_every=2, l1ra_lambda=0.0, seed=1)
    values.update(overrides)
    return l1ra.get_l1ra_model(make_model("llama"), l1ra.L1RAConfig(**values))


def _run_callback(tmp_path, max_steps: int):
    from l1ra.app.monitor import Recorder, RunCallback

    run_config = {"model_path": "tiny", "data": {"dataset": "tiny"}, "max_steps": max_steps, "options": {},
                  "l1ra_config": {}}
    recorder = Recorder(tmp_path, "causal-lm", {}, run_config, budget=0, trainable=0)
    return RunCallback(recorder, max_steps)


# ---------------------------------------------------------------------------------------------------------------
# Item 5: the non-finite guard


class PruneThenPoison(TrainerCallback):
    """At step 2 (a reallocation step) zero two ranks of the first adapter so that the reallocation moves them, then,
    once it has run, put a NaN into the lora_A of an adapter that received ranks (a new tensor in today's design)."""

    def __init__(self, model):
        self.model = model
        self.poisoned = None

    def on_optimizer_step(self, args, state, control, **kwargs):  # runs before L1RACallback's (earlier in the list)
        if state.global_step + 1 == 2:
            with torch.no_grad():
                next(iter(l1ra.gates(self.model).values()))[:2] = 0.0

    def on_step_end(self, args, state, control, **kwargs):  # runs before RunCallback's
        event = l1ra.rank_history(self.model).events[-1]
        if state.global_step == 2 and event.added:
            receiver = next(iter(event.added))
            layer = dict(self.model.l1ra_state.layers)[receiver]
            with torch.no_grad():
                layer.lora_A["default"].weight[-1, 0] = float("nan")
            self.poisoned = receiver


def test_nan_in_a_lora_A_that_a_reallocation_created_stops_the_run(tmp_path):
    model = _l1ra_llama()
    poison = PruneThenPoison(model)
    guard = _run_callback(tmp_path, max_steps=3)
    data = [{k: v[0] for k, v in make_batch("llama", batch=1, seed=i).items()} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1,
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizers=(l1ra.create_optimizer(model, lr=1e-2), None),
                      callbacks=[poison, l1ra.L1RACallback(), guard])
    trainer.train()
    guard.close()
    assert poison.poisoned is not None, "the reallocation at step 2 must have added ranks"
    assert guard.nonfinite == 2, "the guard must check the lora_A the reallocation created, when it stops the run"
    assert trainer.state.global_step == 2


def test_the_guard_reads_its_flag_only_when_the_trainer_syncs(tmp_path):
    model = _l1ra_llama()
    guard = _run_callback(tmp_path, max_steps=10)
    args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), report_to=[], use_cpu=True)
    state, control = TrainerState(max_steps=10), TrainerControl()
    guard.on_train_begin(args, state, control, model=model)
    state.global_step = 1
    with torch.no_grad():
        next(iter(l1ra.gates(model).values()))[0] = float("inf")
    with no_host_sync():  # an ordinary step: checked on the device, nothing read
        guard.on_step_end(args, state, control, model=model)
    assert guard.nonfinite is None and guard.pending is not None
    guard.on_log(args, state, control, logs={"loss": 1.0}, model=model)  # after the Trainer read its loss
    assert guard.nonfinite == 1 and control.should_training_stop and not control.should_save
    guard.close()
