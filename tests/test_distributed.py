"""L1RA under DistributedDataParallel (real gloo process groups, real `torchrun` / `accelerate launch` processes) and
its refusal of FSDP / DeepSpeed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel as DDP

import l1ra
from l1ra import distributed as l1ra_dist
from l1ra import sharded
from conftest import make_batch, make_model

WORKER = Path(__file__).with_name("l1ra_worker.py")
ROOT = WORKER.parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    return env


def _run(cmd: list[str], timeout: int = 240) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


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


# ---------------------------------------------------------------------------------------------------------------
# Two real processes


@pytest.mark.slow
def test_torchrun_plain_loop_two_processes_match_single_process(tmp_path):
    """torchrun, 2 gloo processes, plain loop with find_unused_parameters=True (what Trainer uses for PEFT)."""
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    _run([
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        str(WORKER), "plain", "--out", str(ddp_out), "--steps", "12", "--global-batch", "4", "--find-unused",
    ])
    _run([sys.executable, str(WORKER), "plain", "--out", str(single_out), "--steps", "12", "--global-batch", "4"])
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
    _run([
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        str(WORKER), "plain", "--out", str(ddp_out), "--find-unused", *flags,
    ])
    _run([sys.executable, str(WORKER), "plain", "--out", str(single_out), *flags])
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
    _run([
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
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


# ---------------------------------------------------------------------------------------------------------------
# In-process, one-process gloo group: the rebuild keeps the wrapper's settings


@pytest.fixture
def gloo_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _l1ra_model(**overrides):
    values = dict(r=4, target_modules="all-linear", task_type="CAUSAL_LM", update_every=1, seed=3)
    values.update(overrides)
    return l1ra.get_l1ra_model(make_model("llama", seed=0), l1ra.L1RAConfig(**values))


def _zero_some_gates(model) -> None:
    with torch.no_grad():
        for i, gate in enumerate(l1ra.gates(model).values()):
            if i % 3 == 0:
                gate[:2] = 0.0


@pytest.mark.parametrize("static_graph", [False, True])
def test_reallocation_under_ddp_keeps_the_reducer_comm_hook_and_static_graph(gloo_group, static_graph):
    """Fixed shapes: DDP's reducer, buckets and comm hook stay valid across reallocations; nothing is rebuilt."""
    model = _l1ra_model()
    model.train()
    opt = l1ra.create_optimizer(model, lr=1e-2)
    ddp = DDP(model, static_graph=static_graph)
    calls = []

    def hook(state, bucket):
        calls.append(len(bucket.parameters()))
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    ddp.register_comm_hook(None, hook)
    batch = make_batch("llama")
    for _ in range(2):  # static graph records its graph in the first iterations
        ddp(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    _zero_some_gates(model)
    reducer = ddp.reducer
    event = l1ra.reallocate(model, opt)  # the unwrapped model, as L1RACallback sees it
    assert event.moved > 0 and ddp.reducer is reducer
    calls.clear()
    for _ in range(2):
        ddp(**batch).loss.backward()
        assert calls, "the comm hook still runs"
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        opt.step()
        opt.zero_grad()
        calls.clear()


def test_the_plan_inputs_are_broadcast_from_rank_0(gloo_group):
    """One process here: agree_from_rank0 runs the real broadcast (world size 1 returns the inputs unchanged)."""
    flat, sens = torch.tensor([0.5, 0.0, 1.0]), torch.tensor([1.0, 2.0, 3.0])
    agreed, agreed_sens = l1ra_dist.agree_from_rank0(flat, sens)
    assert torch.equal(agreed, flat) and torch.equal(agreed_sens, sens)


# ---------------------------------------------------------------------------------------------------------------
# FSDP / DeepSpeed: refused with the reason and the alternative


@pytest.mark.parametrize(
    "env,kind",
    [({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP1.*fully_shard"),
     ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed.*DistributedDataParallel")],
)
def test_accelerate_sharded_configs_are_refused(monkeypatch, env, kind):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    model = _l1ra_model()
    opt = l1ra.create_optimizer(model, lr=1e-2)
    with pytest.raises(l1ra_dist.DistributedSetupError, match=f"does not support {kind}"):
        l1ra.after_optimizer_step(model, opt)


@pytest.mark.parametrize("version", ["2", None])  # None: an Accelerator(fsdp_plugin=...) sets no FSDP_VERSION
def test_accelerate_fsdp2_config_is_accepted(monkeypatch, version):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    if version is None:
        monkeypatch.delenv("FSDP_VERSION", raising=False)
    else:
        monkeypatch.setenv("FSDP_VERSION", version)
    l1ra_dist.check_not_sharded(_l1ra_model())


def test_trainer_args_fsdp1_and_deepspeed_refused_at_train_begin():
    from types import SimpleNamespace

    model = _l1ra_model()
    opt = l1ra.create_optimizer(model, lr=1e-2)
    args = SimpleNamespace(fsdp=["full_shard"], fsdp_config={"version": 1}, deepspeed=None)
    with pytest.raises(l1ra_dist.DistributedSetupError, match="FSDP1.*version 1.*fully_shard"):
        l1ra.L1RACallback().on_train_begin(args, SimpleNamespace(max_steps=10), None, model=model, optimizer=opt)
    # FSDP2 (transformers' default fsdp_config version) passes the check
    l1ra_dist.check_not_sharded(model, opt, SimpleNamespace(fsdp=["full_shard"], fsdp_config={}, deepspeed=None))
    args = SimpleNamespace(fsdp=[], deepspeed="ds_config.json")
    with pytest.raises(l1ra_dist.DistributedSetupError, match="ZeRO-1/2 keep flat fp32 master.*safe_set_full_fp32_param.*FSDP2"):
        l1ra.L1RACallback().on_train_begin(args, SimpleNamespace(max_steps=10), None, model=model, optimizer=opt)


def test_zero3_partitioned_parameters_refused():
    model = _l1ra_model()
    opt = l1ra.create_optimizer(model, lr=1e-2)
    next(p for p in model.parameters()).ds_id = 0  # how DeepSpeed ZeRO-3 marks the parameters it partitions
    with pytest.raises(l1ra_dist.DistributedSetupError, match="ZeRO-3"):
        l1ra.after_optimizer_step(model, opt)


def test_fsdp2_fully_shard_one_process_reallocates(gloo_group):
    """FSDP2 over a 1-process mesh: parameters are DTensors; the proximal step and a reallocation run on them (the
    2-process runs are in tests/test_fsdp.py)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _l1ra_model()
    model.train()
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    opt = l1ra.create_optimizer(model, lr=1e-2)
    model(**make_batch("llama")).loss.backward()
    opt.step()
    l1ra.after_optimizer_step(model, opt)
    assert type(next(iter(l1ra.gates(model).values()))).__name__ == "DTensor"
    for i, gate in enumerate(l1ra.gates(model).values()):
        if i % 3 == 0:
            sharded.fill_slots_(gate, 0, torch.tensor([0, 1]), 0.0)
    assert l1ra.reallocate(model, opt).moved > 0


@pytest.mark.slow
def test_gates_cast_before_the_trainer_are_restored_before_ddp_wraps_them(tmp_path):
    """TRL casts a quantized model's trainable parameters (the gates too) to bf16 before the Trainer exists; L1RA must
    restore them to fp32 before the Trainer wraps the model in DDP, whose gradient hooks hang on each parameter's
    gradient accumulator (a later `gate.data = ...` drops them, and the gates' gradients stay local)."""
    out = tmp_path / "cast"
    _run([
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
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


def test_fully_shard_before_get_l1ra_model_refused(gloo_group):
    """LoRA layers added to an already sharded model stay plain tensors whose gradients FSDP2 never reduces."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    base = make_model("llama", seed=0)
    fully_shard(base, mesh=init_device_mesh("cpu", (1,)))
    model = l1ra.get_l1ra_model(base, l1ra.L1RAConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM", update_every=2))
    opt = l1ra.create_optimizer(model, lr=1e-2)
    with pytest.raises(sharded.ShardedLayoutError, match="fully_shard ran before get_l1ra_model"):
        l1ra.after_optimizer_step(model, opt)
