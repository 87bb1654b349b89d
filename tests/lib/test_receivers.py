"""The receivers' order: the paper's smallest-gate rule, and the experimental gradient signal
(`receiver_signal='sensitivity'`)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import l1ra
from l1ra import L1RAConfig
from l1ra.allocator import plan_reallocation

from conftest import make_batch, make_model
from test_allocator import gate_vectors


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(data=st.data(), gates=gate_vectors, exclude_pruned=st.booleans())
def test_any_priority_keeps_the_budget_and_only_reorders(data, gates, exclude_pruned):
    priority = data.draw(st.lists(st.floats(0, 10), min_size=len(gates), max_size=len(gates)))
    tensors = [torch.tensor(g) for g in gates]
    plans = plan_reallocation(tensors, exclude_pruned=exclude_pruned, priority=priority)
    default = plan_reallocation(tensors, exclude_pruned=exclude_pruned)
    assert sum(p.rank for p in plans) == sum(len(g) for g in gates)
    assert [p.keep for p in plans] == [p.keep for p in default], "the priority changes who receives, not who is pruned"
    assert sum(p.n_new for p in plans) == sum(p.n_new for p in default)


def test_priority_replaces_the_smallest_gate_order():
    gates = [
        torch.tensor([0.0, 0.0, 0.5]),  # pruned: 2 freed
        torch.tensor([0.9, 0.8]),  # strongest weakest gate: first by default
        torch.tensor([0.3, 0.2]),
        torch.tensor([0.6, 0.5]),
    ]
    assert [p.n_new for p in plan_reallocation(gates)] == [0, 1, 0, 1]
    assert [p.n_new for p in plan_reallocation(gates, priority=[9.0, 0.1, 5.0, 2.0])] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="priority"):
        plan_reallocation(gates, priority=[1.0])


def _build(**overrides):
    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM",
               update_every=3, l1ra_lambda=0.0, receiver_signal="sensitivity")
    cfg.update(overrides)
    return l1ra.get_l1ra_model(make_model("llama"), L1RAConfig(**cfg))


def test_sensitivity_sums_gate_times_grad_and_picks_the_receivers():
    model = _build()
    opt = l1ra.create_optimizer(model, lr=1e-2)
    batch = make_batch("llama")
    names = list(l1ra.gates(model))
    expected = torch.zeros(sum(g.numel() for g in l1ra.gates(model).values()))
    model.train()
    for step in range(3):
        model(**batch).loss.backward()
        opt.step()
        if step == 2:  # prune two ranks of the first adapter, so that two ranks are handed out
            with torch.no_grad():
                l1ra.gates(model)[names[0]][:2] = 0.0
        # |c * dL/dc| at the gates as after_optimizer_step finds them, before its L1 step moves them
        expected += torch.cat([(g.detach() * g.grad).abs() for g in l1ra.gates(model).values()])
        # mean over each adapter's live slots (0-3 of its 8; dead slots have zero gradient)
        per_adapter = [float(s[:4].mean()) for s in torch.split(expected, [8] * len(names))]
        event = l1ra.after_optimizer_step(model, opt)
        if step < 2:
            torch.testing.assert_close(model.l1ra_state.sensitivity, expected)
        opt.zero_grad()
    assert event is not None and event.pruned == {names[0]: 2}
    top_two = sorted(range(1, len(names)), key=lambda i: -per_adapter[i])[:2]
    assert set(event.added) == {names[i] for i in top_two}
    assert model.l1ra_state.sensitivity is None, "the sums restart after a reallocation"
    # the default order would have picked other receivers here (all gates are 1: ties, first in module order)
    assert set(event.added) != set(names[1:3])


def test_sensitivity_needs_the_gradients_and_says_where_to_call():
    model = _build()
    opt = l1ra.create_optimizer(model, lr=1e-2)
    model(**make_batch("llama")).loss.backward()
    opt.step()
    opt.zero_grad()
    with pytest.raises(ValueError, match="before optimizer.zero_grad"):
        l1ra.after_optimizer_step(model, opt)


def test_sensitivity_survives_a_checkpoint(tmp_path):
    model = _build(update_every=100)
    opt = l1ra.create_optimizer(model, lr=1e-2)
    batch = make_batch("llama")
    model.train()
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        l1ra.after_optimizer_step(model, opt)
        opt.zero_grad()
    saved = model.l1ra_state.sensitivity.clone()
    assert saved.abs().sum() > 0
    model.save_pretrained(tmp_path / "ckpt")
    again = l1ra.from_pretrained(make_model("llama"), tmp_path / "ckpt", is_trainable=True)
    assert torch.equal(again.l1ra_state.sensitivity, saved)


def test_receiver_signal_is_validated():
    with pytest.raises(ValueError, match="receiver_signal='gradient' is invalid: use 'min_gate'"):
        L1RAConfig(r=4, target_modules=["q_proj"], receiver_signal="gradient")
