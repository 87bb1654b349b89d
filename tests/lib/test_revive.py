"""How new ranks start (issue 24): `new_rank_init="gradient"` (A rows from the sketched weight gradient) and
`new_rank_grace` (new ranks skip the L1 step for a while)."""

from __future__ import annotations

import pytest
import torch

import l1ra
from l1ra import L1RAConfig
from l1ra.revive import fresh_row_norm

from conftest import make_batch, make_model
from helpers import logits


def kill_gates(model, seed=3):
    """Gates of slots 0 and 1 in the first `seed` adapters set to exactly 0 (the others receive the ranks)."""
    with torch.no_grad():
        for gate in list(l1ra.gates(model).values())[:seed]:
            gate[:2] = 0.0


def _model(**overrides):
    values = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM",
                  update_every=2, l1ra_lambda=0.0, total_steps=100, new_rank_init="gradient")
    values.update(overrides)
    return l1ra.get_l1ra_model(make_model("llama"), L1RAConfig(**values))


class ExactGradient:
    """G = sum_t delta_t x_t^T of every adapted module's base weight, accumulated densely (the reference)."""

    def __init__(self, model):
        self.g, self.handles = {}, []
        for name, layer in model.l1ra_state.layers:
            self.handles.append(layer.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, args, output):
            x = args[0].detach()

            def on_grad(delta):
                g = delta.reshape(-1, delta.shape[-1]).T.double() @ x.reshape(-1, x.shape[-1]).double()
                self.g[name] = self.g.get(name, 0) + g
            output.register_hook(on_grad)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _step_into_reallocation(model, batch, kill_seed=3):
    """Step 1, then step 2 (a reallocation step) with the exact gradient recorded, gates killed after its optimizer
    step. Returns the
    event, the exact gradients, the live slots before and the logits just before the reallocation."""
    opt = l1ra.create_optimizer(model, lr=1e-2)
    model.train()
    model(**batch).loss.backward()
    opt.step()
    assert l1ra.after_optimizer_step(model, opt) is None
    opt.zero_grad()
    gradient = model.l1ra_state.config.new_rank_init == "gradient"
    assert (model.l1ra_state.capture is not None) == gradient, "armed for the step before the reallocation"
    live_before = {k: list(v) for k, v in l1ra.live_slots(model).items()}
    exact = ExactGradient(model)
    model.train()
    model(**batch).loss.backward()
    exact.remove()
    opt.step()
    kill_gates(model, kill_seed)
    with torch.no_grad():  # what the proximal step (lambda 0) does before the reallocation: the box [0, 1]
        for g in l1ra.gates(model).values():
            g.clamp_(0, 1)
    expected = logits(model, batch)
    model.train()
    event = l1ra.after_optimizer_step(model, opt)
    assert event is not None and event.added, "the scenario must hand ranks on"
    assert model.l1ra_state.capture is None, "disarmed after the reallocation"
    return event, exact.g, live_before, expected


def test_gradient_rows_are_the_top_directions_of_the_weight_gradient_orthogonal_to_the_live_rows():
    """12 tokens <= the sketch's width: the sketch is exact, so each new row is G's top right singular vector with
    the surviving A rows projected out (up to sign); the model's output is unchanged and rows are orthogonal."""
    model = _model()
    batch = make_batch("llama", batch=1, length=12)
    event, exact, live_before, expected = _step_into_reallocation(model, batch)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-6, rtol=0)
    assert sum(l1ra.rank_pattern(model).values()) == model.l1ra_state.budget
    layers = dict(model.l1ra_state.layers)
    for name, n_new in event.added.items():
        a = layers[name].lora_A["default"].weight.detach().double()
        live = l1ra.live_slots(model)[name]
        new = [s for s in live if s not in live_before[name]]  # receivers were not pruned (exclude_pruned)
        assert len(new) == n_new
        survivors = [s for s in live if s not in new]
        rows, kept = a[new], a[survivors]
        # orthogonal to the surviving rows and to each other, each at a fresh row's norm
        assert float((rows @ kept.T).abs().max()) < 1e-5
        torch.testing.assert_close(rows @ rows.T, torch.eye(len(new), dtype=torch.float64) / 3, atol=1e-5, rtol=0)
        assert abs(float(rows[0].norm()) - fresh_row_norm()) < 1e-5
        # the reference: top right singular vectors of G with the survivors projected out
        basis = torch.linalg.qr(kept.T).Q
        g = exact[name] - (exact[name] @ basis) @ basis.T
        _, s, vh = torch.linalg.svd(g, full_matrices=False)
        for i in range(len(new)):
            if i + 1 < len(s) and s[i + 1] > 0.99 * s[i]:
                break  # a near tie: the direction is not defined
            cos = float((rows[i] / rows[i].norm()) @ vh[i])
            assert abs(cos) > 0.999, (name, i, cos)


def test_a_gradient_row_gets_a_larger_first_b_gradient_than_a_random_row():
    """B's gradient for a new rank is scaling * gate * G a: the top direction maximises it among unit rows."""
    norms = {}
    for init in ("random", "gradient"):
        model = _model(new_rank_init=init)
        batch = make_batch("llama", batch=1, length=12)
        event, _, live_before, _ = _step_into_reallocation(model, batch)
        model.zero_grad()
        model.train()
        model(**batch).loss.backward()
        layers = dict(model.l1ra_state.layers)
        total = 0.0
        for name in event.added:
            new = [s for s in l1ra.live_slots(model)[name] if s not in live_before[name]]
            total += float(layers[name].lora_B["default"].weight.grad[:, new].norm() ** 2)
        norms[init] = total ** 0.5
    assert norms["gradient"] > 3 * norms["random"], norms


def test_reallocate_outside_the_schedule_warns_and_falls_back_to_orthogonal_random_rows():
    model = _model(update_every=10**6)
    opt = l1ra.create_optimizer(model, lr=1e-2)
    kill_gates(model, 3)
    live_before = {k: list(v) for k, v in l1ra.live_slots(model).items()}
    with pytest.warns(UserWarning, match="found no sketched gradient"):
        event = l1ra.reallocate(model, opt)
    name = next(iter(event.added))
    a = dict(model.l1ra_state.layers)[name].lora_A["default"].weight.detach()
    new = [s for s in l1ra.live_slots(model)[name] if s not in live_before[name]]
    old = [s for s in l1ra.live_slots(model)[name] if s in live_before[name]]
    assert float((a[new] @ a[old].T).abs().max()) < 1e-5


def test_grace_exempts_new_ranks_from_the_l1_step_for_k_steps_and_survives_a_resume(tmp_path):
    model = _model(new_rank_init="random", new_rank_grace=3, l1ra_lambda=1.0, update_every=2)
    opt = l1ra.create_optimizer(model, lr=1e-3)
    batch = make_batch("llama")
    model.train()
    model(**batch).loss.backward()
    opt.step()
    l1ra.after_optimizer_step(model, opt)
    opt.zero_grad()
    live_before = {k: list(v) for k, v in l1ra.live_slots(model).items()}
    model(**batch).loss.backward()
    opt.step()
    kill_gates(model, 3)
    event = l1ra.after_optimizer_step(model, opt)  # step 2: reallocation
    opt.zero_grad()
    name = next(iter(event.added))
    new = [s for s in l1ra.live_slots(model)[name] if s not in live_before[name]]
    old = [s for s in l1ra.live_slots(model)[name] if s in live_before[name]]
    gate = l1ra.gates(model)[name]
    assert model.l1ra_state.grace[name] == {s: 5 for s in new}
    model.save_pretrained(tmp_path / "ckpt")
    resumed = l1ra.from_pretrained(make_model("llama"), tmp_path / "ckpt", is_trainable=True)
    assert resumed.l1ra_state.grace == model.l1ra_state.grace
    for step in (3, 4, 5, 6):
        old_before = gate.detach()[old].clone()
        model(**batch).loss.backward()
        opt.step()
        moved_by_optimizer = gate.detach().clone()
        l1ra.after_optimizer_step(model, opt, step=step)
        opt.zero_grad()
        if step <= 5:  # in grace: only the optimizer moved the new gates
            torch.testing.assert_close(gate.detach()[new], moved_by_optimizer[new].clamp(0, 1), atol=0, rtol=0)
        else:  # grace over: the proximal step applies (tau = lr * lambda = 1e-3)
            assert torch.all(gate.detach()[new] <= moved_by_optimizer[new] - 1e-3 + 1e-7)
        assert torch.all(gate.detach()[old] <= old_before + 1e-2)
    assert name not in model.l1ra_state.grace


def test_config_validates_the_new_options():
    with pytest.raises(ValueError, match="new_rank_init='svd'.*'random'.*'gradient'"):
        L1RAConfig(r=4, new_rank_init="svd")
    with pytest.raises(ValueError, match="new_rank_grace=1.5.*fraction"):
        L1RAConfig(r=4, new_rank_grace=1.5)
    with pytest.raises(ValueError, match="new_rank_grace=-1"):
        L1RAConfig(r=4, new_rank_grace=-1)
    assert L1RAConfig(r=4, new_rank_grace=0.1).grace_steps(150) == 15
    assert L1RAConfig(r=4, new_rank_grace=0.0).grace_steps(150) == 0
