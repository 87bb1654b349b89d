"""L1RA under DistributedDataParallel in a one-process gloo group (the wrapper rebuilt in place, the plan broadcast)
and its refusal of FSDP1 / DeepSpeed. Two real processes: tests/integration/test_ddp.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import l1ra
from l1ra import distributed as l1ra_dist
from l1ra import sharded
from conftest import make_batch, make_model
from helpers import free_port


# ---------------------------------------------------------------------------------------------------------------
# In-process, one-process gloo group: the rebuild keeps the wrapper's settings


@pytest.fixture
def gloo_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
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
    2-process runs are in tests/integration/test_fsdp.py)."""
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
