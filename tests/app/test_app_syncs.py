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
    from l1ra.app.train.monitor import Recorder, RunCallback

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


# ---------------------------------------------------------------------------------------------------------------
# Item 9: the LM loss of `l1ra train` makes no host sync per micro-batch

# transformers' causal-mask builder reads the attention mask (padded batches) or the position ids (padding-free) on
# the host once per forward; that is transformers' code, not l1ra's, so it runs unchecked
TRANSFORMERS_MASK = [(__import__("transformers.models.llama.modeling_llama", fromlist=["x"]), "create_causal_mask")]


def _lm_examples(n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 12, (1,), generator=g))
        ids = torch.randint(1, 96, (length,), generator=g).tolist()
        cut = int(torch.randint(1, length - 2, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return out


def _boolean_mask_losses(model, inputs, sparse_head):
    """The previous implementation (boolean masks, `nonzero`, `int(...)`), kept as the reference for the values."""
    import torch.nn.functional as F

    labels = inputs["labels"]
    feed = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
    targets = labels[:, 1:]
    carry = targets != -100
    keep = carry.any(0).nonzero().squeeze(1) if sparse_head else None
    if sparse_head:
        logits = model(**feed, use_cache=False, logits_to_keep=keep).logits
        targets, carry = targets[:, keep], carry[:, keep]
    else:
        logits = model(**feed, use_cache=False).logits[:, :-1]
    loss = F.cross_entropy(logits[carry].float(), targets[carry], reduction="none")
    if labels.size(0) == 1 and "attention_mask" not in inputs:
        starts = (inputs["position_ids"][0] == 0).long()
        example = starts.cumsum(0)[:-1] - 1
        example = (example[keep] if keep is not None else example).unsqueeze(0).expand_as(carry)[carry]
        return loss, example, int(starts.sum())
    return loss, torch.arange(labels.size(0)).unsqueeze(1).expand_as(carry)[carry], labels.size(0)


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse-head", "full-head"])
def test_lm_loss_is_the_same_and_makes_no_host_sync(padding_free, sparse):
    from l1ra.app.train.trainers import lm_collator, lm_token_losses, token_stats

    model = _l1ra_llama().train()
    batch = lm_collator(0, padding_free=padding_free)(_lm_examples())
    with torch.no_grad():
        want = _boolean_mask_losses(model.eval(), batch, sparse)
        got = lm_token_losses(model, batch, sparse_head=sparse)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2] == 5
    model.train()
    with no_host_sync(exempt=TRANSFORMERS_MASK):
        loss, example, n = lm_token_losses(model, batch, sparse_head=sparse)
        loss.sum().backward()
        token_stats(loss, example, n)


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding-free", "padded"])
def test_lm_trainer_training_step_makes_no_host_sync(tmp_path, padding_free):
    """`l1ra train`'s Trainer (build_trainer -> LMTrainer): a whole micro-batch step, forward, loss and backward."""
    from l1ra.app.train import data
    from l1ra.app.train.trainers import build_trainer
    from helpers import make_tokenizer
    from test_train_recipe import PC, _tiny_llama

    tok = make_tokenizer()
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f"{i} plus {i} is {2 * i}."} for i in range(6)]
    sft, _ = data.sft_rows(tok, rows, PC, 64)
    model = l1ra.get_l1ra_model(_tiny_llama(len(tok)), l1ra.L1RAConfig(r=2, target_modules="all-linear",
                                                                      task_type="CAUSAL_LM", update_every=100))
    args = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, max_steps=1,
                per_device_train_batch_size=3)
    trainer = build_trainer("causal-lm", model, tok, sft, sft[:2], args, None, [], 64, padding_free=padding_free)
    assert trainer.sparse_head and trainer.data_collator.padding_free == padding_free
    batch = trainer._prepare_inputs(trainer.data_collator(trainer.train_dataset.to_list()[:3]))
    num_items = (batch["labels"] != -100).sum()
    with no_host_sync(exempt=TRANSFORMERS_MASK):
        loss = trainer.training_step(trainer.model, batch, num_items)
    assert torch.isfinite(loss).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_cuda_lm_loss_and_guard_make_no_sync(tmp_path, padding_free):
    """torch.cuda.set_sync_debug_mode('error') inside: every real synchronisation raises."""
    from l1ra.app.train.trainers import lm_collator, lm_token_losses

    model = _l1ra_llama().cuda().train()
    batch = {k: v.cuda() if torch.is_tensor(v) else v
             for k, v in lm_collator(0, padding_free=padding_free)(_lm_examples()).items()}
    guard = _run_callback(tmp_path, max_steps=10)
    args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), report_to=[])
    state, control = TrainerState(max_steps=10), TrainerControl()
    guard.on_train_begin(args, state, control, model=model)
    state.global_step = 1
    with no_host_sync(exempt=TRANSFORMERS_MASK):
        loss, _, _ = lm_token_losses(model, batch, sparse_head=True)
        loss.mean().backward()
        guard.on_step_end(args, state, control, model=model)
    guard.close()
