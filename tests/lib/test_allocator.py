"""The allocator as plain tensor functions: budget, min/max rank, ordering, determinism."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from l1ra.allocator import is_reallocation_step, plan_reallocation, prune_mask

gate_value = st.sampled_from([0.0, 0.0, 0.3, 0.7, 1.0]) | st.floats(0, 1)
gate_vectors = st.lists(st.lists(gate_value, min_size=1, max_size=8), min_size=1, max_size=10)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(
    gates=gate_vectors,
    min_rank=st.integers(1, 3),
    use_cap=st.booleans(),
    exclude_pruned=st.booleans(),
    threshold=st.sampled_from([0.0, 0.05, 0.5]),
)
def test_budget_and_rank_bounds_hold_for_any_gates(gates, min_rank, use_cap, exclude_pruned, threshold):
    tensors = [torch.tensor(g) for g in gates]
    budget = sum(len(g) for g in gates)
    max_rank = max(max(len(g) for g in gates), -(-budget // len(gates))) if use_cap else None
    plans = plan_reallocation(
        tensors, prune_threshold=threshold, min_rank=min_rank, max_rank=max_rank, exclude_pruned=exclude_pruned
    )
    assert sum(p.rank for p in plans) == budget
    for plan, g in zip(plans, tensors):
        assert list(plan.keep) == sorted(plan.keep), "survivors keep their order"
        assert len(plan.keep) >= min(min_rank, len(g))
        if max_rank is not None:
            assert plan.rank <= max_rank
        dropped = set(range(len(g))) - set(plan.keep)
        # (compared in the gates' dtype, as the allocator does)
        assert all(bool(g[i] <= threshold) for i in dropped), "only gates at/below the threshold are pruned"


@settings(max_examples=100, deadline=None)
@given(gates=gate_vectors)
def test_without_reassign_only_pruning_happens(gates):
    tensors = [torch.tensor(g) for g in gates]  # float32: tiny values underflow to exactly 0
    plans = plan_reallocation(tensors, reassign=False)
    assert all(p.n_new == 0 for p in plans)
    assert [p.rank for p in plans] == [max(int((t > 0).sum()), 1) for t in tensors]


def test_freed_ranks_go_round_robin_to_adapters_with_the_strongest_weakest_gate():
    gates = [
        torch.tensor([0.0, 0.0, 0.0, 0.5]),  # pruned: 3 freed, takes nothing (exclude_pruned)
        torch.tensor([0.9, 0.2]),  # weakest gate 0.2
        torch.tensor([0.8, 0.6]),  # weakest gate 0.6: first in line
    ]
    plans = plan_reallocation(gates)
    assert [p.keep for p in plans] == [(3,), (0, 1), (0, 1)]
    assert [p.n_new for p in plans] == [0, 1, 2]


def test_when_every_adapter_was_pruned_the_budget_is_still_handed_out():
    gates = [torch.tensor([0.0, 0.4]), torch.tensor([0.9, 0.0])]
    plans = plan_reallocation(gates)
    assert sum(p.rank for p in plans) == 4
    assert [p.n_new for p in plans] == [1, 1]  # adapter 1 (weakest 0.9) first, then adapter 0


def test_max_rank_caps_receivers_and_overflow_goes_to_the_next():
    gates = [torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.5])]
    plans = plan_reallocation(gates, max_rank=3)
    assert [p.rank for p in plans] == [1, 3, 2]


def test_min_rank_keeps_the_largest_gates_of_a_collapsed_adapter():
    keep = prune_mask(torch.tensor([0.0, 0.0, 0.0, 0.0]), 0.0, 2)
    assert keep.tolist() == [True, True, False, False]
    keep = prune_mask(torch.tensor([0.01, 0.0, 0.03, 0.02]), 0.05, 2)
    assert keep.tolist() == [False, False, True, True]


def test_exact_zero_threshold_keeps_tiny_positive_gates():
    keep = prune_mask(torch.tensor([1e-12, 0.0, 1.0]), 0.0, 1)
    assert keep.tolist() == [True, False, True]


def test_no_cap_room_is_a_clear_error():
    with pytest.raises(ValueError, match="max_rank"):
        plan_reallocation([torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])], max_rank=1, min_rank=1)


@pytest.mark.parametrize(
    "step,interval,total,due",
    [(0, 10, 100, False), (10, 10, 100, True), (15, 10, 100, False), (100, 10, 100, False), (30, 10, None, True)],
)
def test_reallocation_schedule(step, interval, total, due):
    assert is_reallocation_step(step, interval, total) is due


# ---------------------------------------------------------------------------------------- a budget in parameters

costs_st = st.integers(1, 40)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    gates=gate_vectors,
    min_rank=st.integers(1, 3),
    use_cap=st.booleans(),
    exclude_pruned=st.booleans(),
    threshold=st.sampled_from([0.0, 0.05, 0.5]),
    carry=st.integers(0, 30),
)
def test_parameter_budget_is_never_exceeded_and_the_leftover_buys_no_rank(
    data, gates, min_rank, use_cap, exclude_pruned, threshold, carry
):
    costs = data.draw(st.lists(costs_st, min_size=len(gates), max_size=len(gates)))
    tensors = [torch.tensor(g) for g in gates]
    budget = sum(c * len(g) for c, g in zip(costs, gates)) + carry  # carry: what an earlier round left unspent
    max_rank = max(len(g) for g in gates) + 2 if use_cap else None
    try:
        plans = plan_reallocation(
            tensors, prune_threshold=threshold, min_rank=min_rank, max_rank=max_rank, exclude_pruned=exclude_pruned,
            costs=costs, budget=budget,
        )
    except ValueError as exc:  # only when every adapter is at the cap
        assert "max_rank" in str(exc) and use_cap
        return
    spent = sum(c * p.rank for c, p in zip(costs, plans))
    assert spent <= budget
    left = budget - spent
    open_receivers = [c for c, p in zip(costs, plans) if max_rank is None or p.rank < max_rank]
    assert all(left < c for c in open_receivers), "the leftover would still buy a rank of an eligible receiver"
    for plan, g in zip(plans, tensors):
        assert len(plan.keep) >= min(min_rank, len(g))
        assert all(bool(g[i] <= threshold) for i in set(range(len(g))) - set(plan.keep))


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(gates=gate_vectors, cost=costs_st, exclude_pruned=st.booleans(), use_cap=st.booleans())
def test_equal_costs_give_exactly_the_rank_plan(gates, cost, exclude_pruned, use_cap):
    tensors = [torch.tensor(g) for g in gates]
    budget = sum(len(g) for g in gates)
    max_rank = max(max(len(g) for g in gates), -(-budget // len(gates))) if use_cap else None
    kw = dict(exclude_pruned=exclude_pruned, max_rank=max_rank)
    assert plan_reallocation(tensors, costs=[cost] * len(gates), **kw) == plan_reallocation(tensors, **kw)


def test_a_receiver_that_cannot_afford_a_rank_is_skipped():
    gates = [
        torch.tensor([0.0, 0.0, 0.5]),  # pruned: frees 2 x 10 = 20 parameters
        torch.tensor([0.9, 0.8]),  # first in line, but a rank costs 30
        torch.tensor([0.7, 0.6]),  # second, a rank costs 8: takes two (16), 4 left over
    ]
    plans = plan_reallocation(gates, costs=[10, 30, 8])
    assert [p.n_new for p in plans] == [0, 0, 2]
    # the leftover of an earlier round (budget above today's cost) is spent when it buys a rank
    plans = plan_reallocation(gates, costs=[10, 30, 8], budget=3 * 10 + 2 * 30 + 2 * 8 + 10)
    assert [p.n_new for p in plans] == [0, 1, 0]


def test_bad_costs_are_a_clear_error():
    with pytest.raises(ValueError, match="costs"):
        plan_reallocation([torch.tensor([1.0])], costs=[0])
    with pytest.raises(ValueError, match="costs"):
        plan_reallocation([torch.tensor([1.0])], costs=[1, 2])


def test_parameter_budget_end_to_end_on_a_tiny_model():
    """Many reallocations on a tiny Llama whose modules differ in width: the LoRA parameter count never exceeds the
    start count, ranks do move (into other modules than they left), and no reallocation changes the output."""
    from conftest import make_batch, make_model

    import l1ra
    from l1ra.model import gates, rank_costs, reallocate

    cfg = l1ra.L1RAConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM",
                          budget_unit="params", update_every=10_000, seed=3)
    model = l1ra.get_l1ra_model(make_model("llama"), cfg)
    st = model.l1ra_state
    costs = rank_costs(st.layers, st.adapter, "params")
    assert len(set(costs)) > 1, "the test needs modules of different widths"

    def lora_params():  # live LoRA parameters (the tensors hold the full capacity; dead slots are zero)
        ranks = l1ra.rank_pattern(model)
        return sum(c * ranks[name] for c, (name, _) in zip(costs, st.layers))

    start = lora_params()
    assert st.budget == start == sum(c * 4 for c in costs)
    opt = l1ra.create_optimizer(model, lr=1e-2)
    batch = make_batch("llama")
    g = torch.Generator().manual_seed(0)
    moved = 0
    for round_ in range(12):
        model.train()
        for _ in range(2):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():  # what the L1 does over a long run: some gates reach exactly zero
            for gate in gates(model).values():
                gate.masked_fill_(torch.rand(gate.shape, generator=g) < 0.3, 0.0)
        model.eval()
        with torch.no_grad():
            before = model(input_ids=batch["input_ids"]).logits
            event = reallocate(model, opt)
            after = model(input_ids=batch["input_ids"]).logits
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
        moved += event.moved
        assert lora_params() <= start, f"round {round_}: {lora_params()} > {start}"
        left = start - lora_params()
        assert left < max(costs)
    assert moved > 0


def test_budget_unit_is_validated():
    import l1ra

    with pytest.raises(ValueError, match="budget_unit.*'rank'.*'params'"):
        l1ra.L1RAConfig(budget_unit="parameters")
    assert l1ra.L1RAConfig().budget_unit == "rank" and "budget_unit" in l1ra.L1RAConfig().l1ra_dict()
