"""The allocator as plain tensor functions: budget, min/max rank, ordering, determinism."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from l1ra.allocator import is_reallocation_step, plan_reallocation, prune_mask

gate_value = st.sampled_from([0.0, 0.0, 0.3, 0.7, 1.0]) | st.floats(0, 1)
gate_vectors = st.lists(st.lists(gate_value, min_size=1, max_size=8), min_size=1, max_size=10)


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
