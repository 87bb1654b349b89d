"""L1RA under DistributedDataParallel in real processes: `torchrun` (plain loop) and `accelerate launch` (Trainer),
2 gloo processes on the CPU against one process on the same global batch (the worker is l1ra_worker.py). The
one-process gloo checks are in tests/lib/test_distributed.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from procs import HERE, free_port, run

pytestmark = pytest.mark.slow  # starts several processes

WORKER = HERE / "l1ra_worker.py"


def _results(out: Path, world: int):
    return [
        (json.loads((out / f"result-rank{r}.json").read_text()), load_file(str(out / f"result-rank{r}.safetensors")))
        for r in range(world)
    ]


def _assert_identical_across_ranks(results) -> None:
    (info0, w0), rest = results[0], results[1:]
    for info, w in rest:
        assert info["ranks"] == info0["ranks"]
        assert info["history"] == info0["history"]
        assert w.keys() == w0.keys()
        for k in w0:
            assert torch.equal(w[k], w0[k]), f"{k} differs between processes"


@pytest.mark.slow
def test_torchrun_plain_loop_two_processes_match_single_process(tmp_path):
    """torchrun, 2 gloo processes, plain loop with find_unused_parameters=True (what Trainer uses for PEFT)."""
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    run([
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(WORKER), "plain", "--out", str(ddp_out), "--steps", "12", "--global-batch", "4", "--find-unused",
    ])
    run([sys.executable, str(WORKER), "plain", "--out", str(single_out), "--steps", "12", "--global-batch", "4"])
    results = _results(ddp_out, 2)
    _assert_identical_across_ranks(results)
    info, weights = results[0]
    moved = sum(sum(e["added"].values()) for e in info["history"])
    assert moved > 0, "the run must actually move ranks for this test to mean anything"
    assert info["reducers_seen"] == 1, "the DDP wrapper is never rebuilt"
    # After every reallocation that added ranks, the next backward gave every new rank a gradient (not None, not all
    # zero) and the all-reduced gradients were identical on both processes: the one reducer covers every slot.
    checks = info["new_rank_grads"]
    assert checks and all(c["equal_across_ranks"] and c["nonzero"] and c["modules"] > 0 for c in checks)
    # Same global batch on one process: same decisions, same weights up to float reduction order.
    single_info, single_weights = _results(single_out, 1)[0]
    assert single_info["ranks"] == info["ranks"]
    assert single_info["history"] == info["history"]
    for k, v in single_weights.items():
        torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_gradient_init_and_grace_agree_across_two_processes_and_with_one(tmp_path):
    """new_rank_init='gradient' (issue 24): each process sketches its own half of the batch, the sketches are summed
    and the rows broadcast, so both processes write the same new rows, and the run equals a single process's."""
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    flags = ["--steps", "12", "--global-batch", "4", "--new-rank-init", "gradient", "--grace", "2"]
    run([
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(WORKER), "plain", "--out", str(ddp_out), "--find-unused", *flags,
    ])
    run([sys.executable, str(WORKER), "plain", "--out", str(single_out), *flags])
    results = _results(ddp_out, 2)
    _assert_identical_across_ranks(results)
    info, weights = results[0]
    assert sum(sum(e["added"].values()) for e in info["history"]) > 0
    single_info, single_weights = _results(single_out, 1)[0]
    assert single_info["history"] == info["history"]
    # the sketches are sums in a different order (2 halves vs 1 batch): a singular vector amplifies that rounding by
    # 1 / (its singular-value gap), so the new rows agree to ~1e-5 rather than ~1e-7
    for k, v in single_weights.items():
        torch.testing.assert_close(weights[k], v, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_accelerate_launch_trainer_two_processes(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: Trainer + L1RACallback under DDP (gloo)."""
    out = tmp_path / "acc"
    run([
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(WORKER), "trainer", "--out", str(out), "--steps", "12", "--batch", "2",
    ])
    results = _results(out, 2)
    _assert_identical_across_ranks(results)
    for info, _ in results:
        assert info["world_size"] == 2
        assert info["params_never_replaced"]
        assert info["optimizer_holds_model_params"]
    assert sum(sum(e["added"].values()) for e in results[0][0]["history"]) > 0
    assert sum(results[0][0]["ranks"].values()) == 14 * 4  # budget kept


@pytest.mark.slow
def test_gates_cast_before_the_trainer_are_restored_before_ddp_wraps_them(tmp_path):
    """TRL casts a quantized model's trainable parameters (the gates too) to bf16 before the Trainer exists; L1RA must
    restore them to fp32 before the Trainer wraps the model in DDP, whose gradient hooks hang on each parameter's
    gradient accumulator (a later `gate.data = ...` drops them, and the gates' gradients stay local)."""
    out = tmp_path / "cast"
    run([
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(WORKER), "trainer", "--out", str(out), "--steps", "2", "--batch", "2", "--quantized-cast",
    ])
    grads = [load_file(str(out / f"gate-grads-rank{r}.safetensors")) for r in range(2)]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), f"gate gradient of {name} differs between processes"
    results = _results(out, 2)
    _assert_identical_across_ranks(results)
    assert all(info["gate_dtypes"] == ["torch.float32"] for info, _ in results)
