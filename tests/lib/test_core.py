"""The L1RA model on tiny Llama / GPT-2 (Conv1D) / BERT models: one table of cases, many checks."""

import copy

import pytest
import torch
from torch import nn

import l1ra
from l1ra import L1RAConfig

from conftest import ARCH_CASES, make_batch, make_model
from helpers import build, kill_gates, logits, train_steps

ARCHS = list(ARCH_CASES)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_equals_base_at_init(arch):
    batch = make_batch(arch)
    expected = logits(make_model(arch), batch)
    model = build(arch)
    assert isinstance(model, __import__("peft").PeftModel)
    assert torch.equal(logits(model, batch), expected)
    # Every adapter holds 2 x r slots (the default capacity): the first r live with gate 1, the rest dead (all zero).
    live = l1ra.live_slots(model)
    for name, gate in l1ra.gates(model).items():
        assert gate.shape == (8,) and live[name] == [0, 1, 2, 3]
        assert torch.equal(gate, torch.tensor([1.0] * 4 + [0.0] * 4))
    assert l1ra.rank_pattern(model) == dict.fromkeys(live, 4) and l1ra.capacities(model) == dict.fromkeys(live, 8)
    for _, layer in model.l1ra_state.layers:
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert a.shape[0] == b.shape[1] == 8 and not a[4:].any() and not b[:, 4:].any()


@pytest.mark.parametrize("arch", ARCHS)
def test_gates_scale_the_adapter_output(arch):
    """delta = B diag(c) A x * scaling: zero gates switch the adapter off, gates 1 are plain LoRA."""
    model = build(arch)
    train_steps(model, make_batch(arch), 2, hook=False)  # B != 0
    batch = make_batch(arch)
    no_lora = copy.deepcopy(model)  # same trained head (BERT's classifier is in modules_to_save), B = 0
    with torch.no_grad():
        for name, p in no_lora.named_parameters():
            if "lora_B" in name:
                p.zero_()
    base = logits(no_lora, batch)
    assert not torch.allclose(logits(model, batch), base)
    with torch.no_grad():
        for gate in l1ra.gates(model).values():
            gate.zero_()
    torch.testing.assert_close(logits(model, batch), base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_reallocation_keeps_budget_and_output(arch):
    model = build(arch)
    batch = make_batch(arch)
    opt = train_steps(model, batch, 3, hook=False)
    kill_gates(model)
    budget = sum(l1ra.rank_pattern(model).values())
    before = logits(model, batch)
    event = l1ra.reallocate(model, opt)
    after = logits(model, batch)
    assert sum(l1ra.rank_pattern(model).values()) == budget == model.l1ra_state.budget
    assert event.moved > 0 and sum(event.pruned.values()) == event.moved
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    # PEFT's live config describes the model's (fixed) shapes, so PEFT would rebuild the same modules.
    cfg = model.peft_config["default"]
    assert cfg.rank_pattern == l1ra.capacities(model)
    train_steps(model, batch, 2, opt)  # and training goes on with the same optimizer


def test_budget_invariant_holds_along_a_training_run_with_random_gate_kills():
    model = build("llama", update_every=2, l1ra_lambda=0.0)
    batch = make_batch("llama")
    opt = l1ra.create_optimizer(model, lr=1e-2)
    budget = model.l1ra_state.budget
    for step in range(12):
        model(**batch).loss.backward()
        opt.step()
        kill_gates(model, fraction=0.3, seed=step)
        event = l1ra.after_optimizer_step(model, opt)
        opt.zero_grad()
        assert sum(l1ra.rank_pattern(model).values()) == budget
        assert all(r >= 1 for r in l1ra.rank_pattern(model).values())
        assert (event is not None) == (step % 2 == 1)
    assert len(l1ra.rank_history(model).events) == 1 + 6


def test_optimizer_state_is_kept_for_surviving_ranks_and_zero_for_new_ones():
    model = build("llama")
    batch = make_batch("llama")
    opt = train_steps(model, batch, 3, hook=False)
    name = next(iter(l1ra.gates(model)))
    layer = dict(model.l1ra_state.layers)[name]
    with torch.no_grad():
        l1ra.gates(model)[name][1] = 0.0  # prune rank 1 of the first adapter
    a, b, g = layer.lora_A["default"].weight, layer.lora_B["default"].weight, l1ra.gates(model)[name]
    old_state = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in (a, b, g)}
    objects = {id(p): {k: v for k, v in opt.state[p].items()} for p in (a, b, g)}
    event = l1ra.reallocate(model, opt)
    assert event.pruned == {name: 1}
    assert l1ra.live_slots(model)[name] == [0, 2, 3]  # pruned, so it receives none in this round
    assert not a[1].any() and not b[:, 1].any() and g[1] == 0  # the dead slot is all zero
    kept = torch.tensor([0, 2, 3, 4, 5, 6, 7])
    for p, dim in ((a, 0), (b, 1), (g, 0)):
        for key in ("exp_avg", "exp_avg_sq"):
            value = opt.state[p][key]
            assert value is objects[id(p)][key], "state tensors are written in place, never replaced"
            assert torch.equal(value.index_select(dim, kept), old_state[p][key].index_select(dim, kept))
            assert not value.select(dim, 1).any(), "the pruned slot's moments are reset"
        assert torch.equal(opt.state[p]["step"], old_state[p]["step"])
    # A receiver revived its first dead slot (index 4), whose moments start at zero.
    receiver = next(n for n, r in l1ra.rank_pattern(model).items() if r > 4)
    assert l1ra.live_slots(model)[receiver] == [0, 1, 2, 3, 4]
    recv_a = dict(model.l1ra_state.layers)[receiver].lora_A["default"].weight
    assert not opt.state[recv_a]["exp_avg"][4].any() and recv_a[4].any()
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    train_steps(model, batch, 1, opt)


def _adapter_params(model):
    st = model.l1ra_state
    return {n: (l.lora_A[st.adapter].weight, l.lora_B[st.adapter].weight, l.l1ra_gate[st.adapter]) for n, l in st.layers}


OPTIMIZERS = [
    (torch.optim.AdamW, {}), (torch.optim.Adam, dict(amsgrad=True)), (torch.optim.SGD, dict(momentum=0.9)),
    (torch.optim.Adagrad, {}), (torch.optim.RMSprop, dict(momentum=0.9, centered=True)), (torch.optim.Adafactor, {}),
]


def check_state_kept_in_place(model, opt, params, live_before, states):
    """After a reallocation: no parameter or state tensor replaced, survivors' state exact, changed slots zero."""
    live_after = l1ra.live_slots(model)
    assert _adapter_params(model) == params, "no parameter is replaced"
    for name, ps in params.items():
        gate_before = states[id(ps[2])]["__value__"]
        # survivors: live before and after with a non-zero gate (a zero gate is pruned, and maybe revived in place)
        survivors = torch.tensor(sorted(s for s in set(live_before[name]) & set(live_after[name]) if gate_before[s] > 0), dtype=torch.long)
        changed = torch.tensor(sorted(set(live_before[name]) ^ set(live_after[name])), dtype=torch.long)
        for p, dim in zip(ps, (0, 1, 0)):
            for key, entry in states[id(p)].items():
                if key == "__value__":
                    continue
                obj, old = entry
                new = opt.state[p][key]
                assert new is obj, f"{key} replaced"
                if not torch.is_tensor(old) or old.ndim == 0:
                    assert torch.equal(torch.as_tensor(new), torch.as_tensor(old)), key
                elif old.shape[dim] != p.shape[dim]:  # Adafactor's factor shared by every slot
                    assert torch.equal(new, old), key
                else:
                    assert torch.equal(new.index_select(dim, survivors), old.index_select(dim, survivors)), key
                    assert not new.index_select(dim, changed).any(), key


def snapshot_state(opt, params):
    return {id(p): {"__value__": p.detach().clone(), **{k: (v, v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}}
            for ps in params.values() for p in ps}


@pytest.mark.parametrize("optimizer_cls,kwargs", OPTIMIZERS, ids=[c.__name__ for c, _ in OPTIMIZERS])
def test_any_torch_optimizer_keeps_surviving_state_exactly_and_resets_changed_slots(optimizer_cls, kwargs):
    """In place: surviving slots keep every state entry exactly, pruned and revived slots are zero (as a fresh
    optimizer holds them; Adam's revived moments are seeded later, at their first gradient), step counters and every
    state tensor object are kept. Adafactor: the factor indexed by the rank axis is zeroed at the slot, the shared
    factor is kept."""
    model = build("llama", update_every=2, l1ra_lambda=0.0)
    batch = make_batch("llama")
    opt = l1ra.create_optimizer(model, lr=1e-2, optimizer_cls=optimizer_cls, **kwargs)
    moved = 0
    for step in range(4):
        model(**batch).loss.backward()
        opt.step()
        kill_gates(model, 0.3, seed=step)
        params, live_before = _adapter_params(model), l1ra.live_slots(model)
        states = snapshot_state(opt, params)
        event = l1ra.after_optimizer_step(model, opt)
        opt.zero_grad()
        if event is not None:
            moved += event.moved
            check_state_kept_in_place(model, opt, params, live_before, states)
    assert moved > 0
    assert sum(l1ra.rank_pattern(model).values()) == model.l1ra_state.budget


def test_proximal_step_is_soft_threshold_then_box_with_the_gate_group_lr():
    model = build("llama", l1ra_lambda=0.5, eta_c=0.1, max_rank=4)  # capacity 4: every slot live
    opt = l1ra.create_optimizer(model, lr=1e-3)
    with torch.no_grad():
        values = torch.tensor([1.0, 0.5, 0.03, 0.0])
        for gate in l1ra.gates(model).values():
            gate.copy_(values)
    l1ra.after_optimizer_step(model, opt)  # no grads were taken: only the L1 step acts
    for gate in l1ra.gates(model).values():
        torch.testing.assert_close(gate.detach(), torch.tensor([0.95, 0.45, 0.0, 0.0]))
    # The gate group follows the schedule: tau uses its current lr; a skipped step does nothing.
    for group in opt.param_groups:
        if group["name"] == "l1ra_gates":
            group["lr"] = 0.02
    l1ra.after_optimizer_step(model, opt)
    l1ra.after_optimizer_step(model, opt, optimizer_step_skipped=True)
    gate = next(iter(l1ra.gates(model).values()))
    torch.testing.assert_close(gate.detach(), torch.tensor([0.94, 0.44, 0.0, 0.0]))
    assert model.l1ra_state.step == 3


def test_l1_start_delays_the_penalty_but_keeps_the_box():
    model = build("llama", l1ra_lambda=0.5, eta_c=0.1, l1_start=0.5, total_steps=4, update_every=100, max_rank=4)
    opt = l1ra.create_optimizer(model, lr=1e-3)
    with torch.no_grad():
        for gate in l1ra.gates(model).values():
            gate.copy_(torch.tensor([1.5, 0.5, 0.03, -0.2]))
    for _ in range(2):  # steps 1 and 2 of 4: no L1 yet, only the projection to [0, 1]
        l1ra.after_optimizer_step(model, opt)
    gate = next(iter(l1ra.gates(model).values()))
    torch.testing.assert_close(gate.detach(), torch.tensor([1.0, 0.5, 0.03, 0.0]))
    l1ra.after_optimizer_step(model, opt)  # step 3: tau = 0.1 * 0.5
    torch.testing.assert_close(gate.detach(), torch.tensor([0.95, 0.45, 0.0, 0.0]))


def test_optimizer_groups_give_gates_eta_c_and_no_weight_decay():
    model = build("bert", eta_c=0.03)
    opt = l1ra.create_optimizer(model, lr=1e-4, weight_decay=0.1)
    groups = {g["name"]: g for g in opt.param_groups}
    gate_ids = {id(g) for g in l1ra.gates(model).values()}
    assert {id(p) for p in groups["l1ra_gates"]["params"]} == gate_ids
    assert groups["l1ra_gates"]["lr"] == 0.03 and groups["l1ra_gates"]["weight_decay"] == 0.0
    assert groups["l1ra_adapters"]["lr"] == 1e-4 and groups["l1ra_adapters"]["weight_decay"] == 0.1
    # the classifier head (modules_to_save) trains too, its bias without decay
    assert groups["l1ra_adapters_no_decay"]["weight_decay"] == 0.0


def test_a_user_optimizer_without_the_gates_is_refused():
    model = build("llama")
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_" in n], lr=1e-3)
    with pytest.raises(ValueError, match="create_optimizer"):
        l1ra.after_optimizer_step(model, opt)


def test_same_seed_same_decisions_and_new_rows():
    runs = []
    for _ in range(2):
        model = build("llama", update_every=2, l1ra_lambda=5.0, eta_c=0.1, seed=7)
        train_steps(model, make_batch("llama"), 6)
        runs.append((l1ra.rank_history(model).to_json(), {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}))
    assert runs[0][0] == runs[1][0]
    assert any(e["added"] for e in runs[0][0]), "the strong L1 must have moved rank"
    for key in runs[0][1]:
        assert torch.equal(runs[0][1][key], runs[1][1][key])


def test_the_wrapped_model_is_unwrapped():
    class Wrapper(nn.Module):  # what DDP / Accelerate do: the model sits in `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = build("llama")
    wrapped = Wrapper(model)
    assert l1ra.find_l1ra_model(wrapped) is model
    opt = l1ra.create_optimizer(wrapped, lr=1e-3)
    l1ra.after_optimizer_step(wrapped, opt)
    with pytest.raises(ValueError, match="get_l1ra_model"):
        l1ra.gates(make_model("llama"))


def test_merge_and_unload_and_merge_adapter_keep_the_function():
    model = build("gpt2")
    batch = make_batch("gpt2")
    train_steps(model, batch, 3, hook=False)
    kill_gates(model, 0.3)
    expected = logits(model, batch)
    raw_a = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_A" in k or "l1ra_gate" in k}
    model.merge_adapter()
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    for k, v in model.state_dict().items():
        if k in raw_a:
            assert torch.equal(v, raw_a[k]), f"{k} restored after unmerge"
    merged = model.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=0)


def test_deepcopy_gives_an_independent_working_model():
    model = build("llama")
    train_steps(model, make_batch("llama"), 2, hook=False)
    clone = copy.deepcopy(model)
    batch = make_batch("llama")
    torch.testing.assert_close(logits(clone, batch), logits(model, batch))
    for gate in l1ra.gates(clone).values():
        with torch.no_grad():
            gate.zero_()
    base = logits(make_model("llama"), batch)
    torch.testing.assert_close(logits(clone, batch), base, atol=1e-6, rtol=0)  # the clone's hooks read the clone
    assert not torch.allclose(logits(model, batch), base)


def test_non_linear_targets_are_refused_and_the_model_is_given_back():
    base = make_model("llama")
    names_before = [n for n, _ in base.named_modules()]
    with pytest.raises(ValueError, match="embed_tokens"):
        l1ra.get_l1ra_model(base, L1RAConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    assert [n for n, _ in base.named_modules()] == names_before


def test_target_modules_that_match_nothing_are_a_clear_error():
    with pytest.raises(ValueError, match="not found|did not match|no_such"):
        l1ra.get_l1ra_model(make_model("llama"), L1RAConfig(r=2, target_modules=["no_such_module"]))


def test_rank_pattern_and_alpha_pattern_config_is_respected():
    model = build("llama", rank_pattern={"model.layers.0.self_attn.q_proj": 6}, alpha_pattern={"model.layers.0.self_attn.q_proj": 3})
    ranks = l1ra.rank_pattern(model)
    assert ranks["model.layers.0.self_attn.q_proj"] == 6 and ranks["model.layers.1.self_attn.q_proj"] == 4
    assert model.l1ra_state.budget == sum(ranks.values())
    layer = dict(model.l1ra_state.layers)["model.layers.0.self_attn.q_proj"]
    assert layer.scaling["default"] == pytest.approx(3 / 6)


def test_total_steps_needed_for_fractional_update_every():
    model = build("llama", update_every=0.25)
    opt = l1ra.create_optimizer(model, lr=1e-3)
    with pytest.raises(ValueError, match="total_steps"):
        l1ra.after_optimizer_step(model, opt)
    l1ra.set_total_steps(model, 8)
    events = [l1ra.after_optimizer_step(model, opt) for _ in range(8)]
    assert [i + 2 for i, e in enumerate(events[1:]) if e is not None] == [2, 4, 6]  # not at the last step
