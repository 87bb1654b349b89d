"""Slot writes into FSDP2-sharded parameters and optimizer state (`l1ra.sharded`), under real gloo processes on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from l1ra import sharded
from procs import HERE, torchrun

pytestmark = pytest.mark.slow  # starts several processes

WORKER = HERE / "sharded_slots_worker.py"


def test_fsdp2_slot_writes_two_processes(tmp_path):
    """Capacity 5 over 2 processes (shards of 3 and 2 rows; a 1-row parameter leaves rank 1 empty): fills and writes
    along dim 0 and dim 1 of (C, in), (out, C) and (C,) FSDP2 parameters and of their AdamW moments give, on every
    process, the full tensor torch's own index ops give on plain tensors; no object or storage is replaced; the next
    forward, backward and AdamW steps use the written values (equal to the same steps on a plain module)."""
    torchrun(2, str(WORKER), str(tmp_path))
    for rank in range(2):
        r = json.loads((tmp_path / f"slots-rank{rank}.json").read_text())
        assert set(r["placements"].values()) == {"(Shard(dim=0),)"}
        assert r["state_is_dtensor"]
        assert r["param_errors"] == {"a": 0.0, "b": 0.0, "gate": 0.0, "tiny": 0.0}
        assert set(r["state_errors"].values()) == {0.0} and len(r["state_errors"]) == 8
        assert max(r["after_step_errors"].values()) < 1e-6, r["after_step_errors"]
        assert r["same_objects"], "a parameter, a local shard or an optimizer state tensor was replaced"
        for layout in ("replicate", "shard1"):
            assert r[f"{layout}_error"] == 0.0 and r[f"{layout}_same_storage"]
        assert "Partial" in r["partial_refused"] and "fully_shard" in r["partial_refused"]


def test_plain_tensors_pass_through():
    t = torch.arange(12.0).reshape(3, 4)
    assert not sharded.is_dtensor(t) and sharded.local(t) is t
    sharded.fill_slots_(t, 1, torch.tensor([0, 3]), 0.0)
    sharded.write_slots_(t, 0, torch.tensor([2]), torch.full((1, 4), 7.0))
    assert t.tolist() == [[0, 1, 2, 0], [0, 5, 6, 0], [7, 7, 7, 7]]
    with pytest.raises(IndexError, match="out of range"):
        sharded.fill_slots_(t, 0, torch.tensor([3]), 0.0)
    with pytest.raises(ValueError, match="for 2 slots along dim 1"):
        sharded.write_slots_(t, 1, torch.tensor([0, 1]), torch.zeros(3, 1))
