"""Checkpoints written before fixed capacity (l1ra checkpoint format 1: factors, raw A, gates and sensitivity sums at
the live ranks, no live-slot mask; a Trainer's optimizer.pt with state at the live ranks) still load and resume.

`to_format1` rewrites a current checkpoint folder into the old layout, as l1ra's format-1 writer laid it out (checked
by hand against a Trainer checkpoint written by commit 069a538: same file names, keys, shapes and JSON fields)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback

import l1ra
from l1ra.checkpoint import STATE_JSON, STATE_TENSORS, _sha256
from l1ra.optim import fit_state_to_capacity_

from conftest import make_batch
from helpers import build, kill_gates, logits
from test_trainer import args, lm_dataset


def to_format1(directory, optimizer_names=None):
    """Rewrite the l1ra files (and optimizer.pt, whose parameters are `optimizer_names` by position) of a checkpoint
    folder into format 1: every adapter tensor at its live slots, in slot order."""
    meta = json.loads((directory / STATE_JSON).read_text())
    raw = load_file(str(directory / STATE_TENSORS))
    live = {name: raw.pop(f"{name}.live").bool().nonzero().flatten() for name in meta["ranks"]}
    for key in list(raw):
        name, kind = key.rsplit(".", 1)
        raw[key] = raw[key].index_select(0, live[name]).contiguous()  # lora_A, gate, sensitivity: slots on dim 0
    save_file(raw, str(directory / STATE_TENSORS), metadata={"format": "pt"})
    if optimizer_names is not None:
        saved = torch.load(directory / "optimizer.pt", weights_only=True)
        for index, state in saved["state"].items():
            name, kind, dim = optimizer_names[index]
            for key, value in state.items():
                if torch.is_tensor(value) and value.ndim > 0:
                    state[key] = value.index_select(dim, live[name]).clone()
        torch.save(saved, directory / "optimizer.pt")
    for key in ("capacity", "pending"):
        del meta[key]
    meta["format_version"] = 1
    meta["sha256"] = {n: _sha256(directory / n) for n in meta["sha256"]}
    (directory / STATE_JSON).write_text(json.dumps(meta, indent=1))
    return live


class KillGates(TrainerCallback):
    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step < 3:
            kill_gates(model, 0.4, seed=state.global_step)


def _optimizer_names(model, optimizer):
    """Position in the optimizer's state dict -> (module, kind, rank dim) of each adapter tensor."""
    where = {id(p): (name, kind, dim) for (name, kind), (p, dim) in model.l1ra_state.slot_params().items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: where[id(p)] for i, p in enumerate(params)}


def test_a_format1_adapter_loads_into_capacity_with_the_same_function(tmp_path):
    saved = build("llama", receiver_signal="sensitivity", update_every=10**6)
    kill_gates(saved, 0.4, seed=0)
    assert l1ra.reallocate(saved).moved > 0
    saved.train()
    saved(**make_batch("llama")).loss.backward()
    l1ra.after_optimizer_step(saved, l1ra.create_optimizer(saved, lr=1e-2))  # sensitivity sums to carry over
    saved.save_pretrained(tmp_path)
    live = to_format1(tmp_path)

    model = build("llama", receiver_signal="sensitivity", update_every=10**6)
    model.load_adapter(str(tmp_path), "default")
    assert l1ra.rank_pattern(model) == l1ra.rank_pattern(saved)
    assert l1ra.live_slots(model) == {name: list(range(len(s))) for name, s in live.items()}  # the first slots
    torch.testing.assert_close(logits(model, make_batch("llama")), logits(saved, make_batch("llama")), atol=1e-6, rtol=0)
    st, src = model.l1ra_state, saved.l1ra_state
    assert (st.step, st.reallocations, st.budget) == (src.step, src.reallocations, src.budget)
    assert st.sensitivity.sum().item() == pytest.approx(src.sensitivity.sum().item())
    assert sum(l1ra.rank_pattern(model).values()) == st.budget
    small = build("llama", r=2)  # capacity 4: an adapter that grew past it is refused, naming the fix
    if max(l1ra.rank_pattern(saved).values()) > 4:
        with pytest.raises(l1ra.CheckpointError, match="max_rank"):
            small.load_adapter(str(tmp_path), "default")


def _trainer(model, out, steps, **overrides):
    return Trainer(
        model=model, args=args(out, max_steps=steps, gradient_accumulation_steps=1, **overrides),
        train_dataset=lm_dataset(), optimizers=(l1ra.create_optimizer(model, lr=1e-2), None),
        callbacks=[KillGates(), l1ra.L1RACallback()],
    )


@pytest.mark.slow
def test_a_format1_trainer_checkpoint_resumes_with_its_optimizer_state_in_the_live_slots(tmp_path):
    # Before the fix (no fit_state_to_capacity_ in L1RACallback.on_train_begin) the first resumed step failed inside
    # AdamW: "The size of tensor a (3) must match the size of tensor b (8)".
    model = build("llama", update_every=1, l1ra_lambda=0.0)
    trainer = _trainer(model, tmp_path, 5, save_strategy="steps", save_steps=3)
    trainer.train()
    ckpt = tmp_path / "checkpoint-3"
    saved_state = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    names = _optimizer_names(model, trainer.optimizer)
    live = to_format1(ckpt, names)
    assert any(s.tolist() != list(range(len(s))) for s in live.values()), "live slots to compact, not a prefix"

    seen = {}

    class Capture(TrainerCallback):  # after L1RACallback: the state the first resumed step starts from
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            seen.update({i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(
                optimizer.state[p] for g in optimizer.param_groups for p in g["params"])})

    resumed = build("llama", update_every=1, l1ra_lambda=0.0)
    trainer2 = _trainer(resumed, tmp_path / "resumed", 5)
    trainer2.add_callback(Capture())
    trainer2.train(resume_from_checkpoint=str(ckpt))
    assert resumed.l1ra_state.step == 5 and sum(l1ra.rank_pattern(resumed).values()) == resumed.l1ra_state.budget
    for i, state in saved_state.items():
        name, kind, dim = names[i]
        r = len(live[name])
        for key, value in state.items():
            if value.ndim == 0:
                assert torch.equal(seen[i][key], value), (name, kind, key)
                continue
            got = seen[i][key]
            assert torch.equal(got.narrow(dim, 0, r), value.index_select(dim, live[name])), (name, kind, key)
            assert not got.narrow(dim, r, got.shape[dim] - r).any(), (name, kind, key)  # dead slots: fresh state
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    resumed_losses = {h["step"]: h["loss"] for h in trainer2.state.log_history if "loss" in h}
    assert resumed_losses[4] == pytest.approx(losses[4], abs=1e-5)  # the first resumed step: the same function


def test_live_rank_state_is_placed_into_capacity_and_what_cannot_be_placed_is_refused():
    model = build("llama")  # 4 live ranks in slots 0-3 of 8
    opt = l1ra.create_optimizer(model, lr=1e-2)
    gate = next(iter(l1ra.gates(model).values()))
    opt.state[gate] = {"step": torch.tensor(3.0), "exp_avg": torch.ones(4), "exp_avg_sq": torch.ones(4)}
    assert fit_state_to_capacity_(opt, model.l1ra_state) == 2
    assert opt.state[gate]["exp_avg"].tolist() == [1.0] * 4 + [0.0] * 4
    # bitsandbytes' 8-bit state at capacity shape (block maps of other shapes) is left alone ...
    eight_bit = {"step": 3, "state1": torch.zeros(8, dtype=torch.uint8), "absmax1": torch.ones(1), "qmap1": torch.zeros(256)}
    opt.state[gate] = dict(eight_bit)
    assert fit_state_to_capacity_(opt, model.l1ra_state) == 0 and opt.state[gate]["state1"].shape == (8,)
    # ... and at the live rank it cannot be placed (its blocks would need re-quantizing): refused, naming the way out.
    opt.state[gate] = dict(eight_bit, state1=torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(l1ra.CheckpointError, match=r"state1.*shape \(4,\).*delete optimizer.pt and scheduler.pt"):
        fit_state_to_capacity_(opt, model.l1ra_state)
