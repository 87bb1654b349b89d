"""Fixed-capacity adapters (issue 21): nothing is replaced after get_l1ra_model, dead slots are inert, revived slots
start like a fresh AdamW, torch.compile keeps its graph, bitsandbytes' optimizers, capacity on load."""

from __future__ import annotations

import pytest
import torch

import l1ra
from l1ra import L1RAConfig
from l1ra.distributed import gather_flat

from conftest import make_batch, make_model
from helpers import build, kill_gates, logits


def _tensors(model, opt):
    """Every trainable parameter and optimizer-state tensor: {key: (object id, data_ptr, shape)}."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = (id(p), p.data_ptr(), tuple(p.shape))
            for key, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value):
                    out[f"{name}/{key}"] = (id(value), value.data_ptr(), tuple(value.shape))
    return out


def test_no_parameter_or_state_tensor_is_ever_replaced_and_dead_slots_get_zero_gradient():
    model, batch = build("llama", l1ra_lambda=0.0), make_batch("llama")
    opt = l1ra.create_optimizer(model, lr=1e-2)
    model.train()
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad()
    before, moved = _tensors(model, opt), 0
    for step in range(4):
        kill_gates(model, 0.4, seed=step)
        expected = logits(model, batch)
        event = l1ra.reallocate(model, opt)
        moved += event.moved
        torch.testing.assert_close(logits(model, batch), expected, atol=1e-6, rtol=0)
        assert sum(l1ra.rank_pattern(model).values()) == model.l1ra_state.budget
        model.train()
        model(**batch).loss.backward()
        for name, layer in model.l1ra_state.layers:
            dead = sorted(set(range(8)) - set(l1ra.live_slots(model)[name]))
            a, b, g = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.l1ra_gate["default"]
            assert not a.grad[dead].any() and not b.grad[:, dead].any() and not g.grad[dead].any(), name
            assert not a[dead].any() and not b[:, dead].any() and not g[dead].any(), name
        opt.step()
        opt.zero_grad()
    assert moved > 0
    assert _tensors(model, opt) == before


def _seeded_scenario(optimizer_cls, **kwargs):
    """Issue 21's scenario: tiny Llama (7 module types, r=4), 200 AdamW steps at lr 1e-3, step counts set to 3,000,
    one gate zeroed, one reallocation. Returns (model, optimizer, receiver name, revived slot)."""
    model = l1ra.get_l1ra_model(make_model("llama"), L1RAConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM",
        update_every=10**6, l1ra_lambda=0.0))
    opt = l1ra.create_optimizer(model, lr=1e-3, optimizer_cls=optimizer_cls, **kwargs)
    model.train()
    for i in range(200):
        model(**make_batch("llama", batch=4, seed=i)).loss.backward()
        opt.step()
        opt.zero_grad()
    for state in opt.state.values():
        state["step"].fill_(3000)
    with torch.no_grad():
        next(iter(l1ra.gates(model).values()))[0] = 0.0
    event = l1ra.reallocate(model, opt)
    receiver = next(iter(event.added))
    return model, opt, receiver, l1ra.live_slots(model)[receiver][-1]


def _fresh_update(optimizer_cls, grad, **kwargs):
    fresh = torch.nn.Parameter(torch.zeros_like(grad))
    fresh_opt = optimizer_cls([fresh], lr=1e-3, weight_decay=0.0, **kwargs)
    fresh.grad = grad.clone()
    fresh_opt.step()
    return fresh.detach()


@pytest.mark.parametrize("optimizer_cls,kwargs", [(torch.optim.AdamW, {}), (torch.optim.Adam, dict(amsgrad=True))])
def test_a_revived_slot_steps_like_a_fresh_adamw_in_issue_21s_scenario(optimizer_cls, kwargs):
    """Its B column first (its A row and gate get no gradient until B moves), then its A row: each first update
    equals a fresh AdamW's on the same gradient (before: 0.51x of lr, the survivors' mean second moment)."""
    model, opt, receiver, slot = _seeded_scenario(optimizer_cls, **kwargs)
    layer = dict(model.l1ra_state.layers)[receiver]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    for step, (p, take) in enumerate(((b, lambda t: t[:, slot]), (a, lambda t: t[slot]))):
        before = p.detach().clone()
        model(**make_batch("llama", batch=4, seed=1000 + step)).loss.backward()
        grad = take(p.grad).clone()
        assert grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        update = take(p.detach() - before)
        fresh = _fresh_update(optimizer_cls, grad, **kwargs)
        assert float(update.abs().max()) / 1e-3 <= 1.5
        ratio = float(update.norm() / fresh.norm())
        assert 1 / 1.5 <= ratio <= 1.5, ratio
    assert not model.l1ra_state.pending, "every revived slot was seeded"


def test_a_non_finite_gradient_leaves_the_slot_waiting():
    model, opt, receiver, slot = _seeded_scenario(torch.optim.AdamW)
    b = dict(model.l1ra_state.layers)[receiver].lora_B["default"].weight
    model(**make_batch("llama")).loss.backward()
    b.grad[0, slot] = float("nan")
    from l1ra.optim import SeedHook

    SeedHook(model.l1ra_state)(opt, (), {})  # what the pre-step hook does (without the NaN step that follows)
    assert (receiver, "B") in model.l1ra_state.pending
    assert not opt.state[b]["exp_avg"][:, slot].any()


def test_an_adapter_larger_than_the_capacity_is_refused_naming_max_rank(tmp_path):
    big = build("llama", r=8)
    big.save_pretrained(tmp_path)
    small = build("llama", r=2)  # capacity 4
    with pytest.raises(l1ra.CheckpointError, match="capacity.*max_rank"):
        small.load_adapter(tmp_path, "default")
    roomy = build("llama", r=2, max_rank=16)  # the capacity the checkpoint was trained with
    roomy.load_adapter(tmp_path, "default")
    assert l1ra.rank_pattern(roomy) == l1ra.rank_pattern(big)


@pytest.mark.slow
def test_reallocations_add_no_graph_under_torch_compile():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model, batch = build("llama", update_every=10**6, l1ra_lambda=0.0), make_batch("llama")
    opt = l1ra.create_optimizer(model, lr=1e-2)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    compiled.train()
    moved = 0
    for step in range(5):
        compiled(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if step < 4:
            kill_gates(model, 0.4, seed=step)
            moved += l1ra.reallocate(model, opt).moved
    graphs = counter.frame_count
    assert moved > 0 and graphs >= 1
    compiled(**batch).loss.backward()
    assert counter.frame_count == graphs, "4 reallocations made new graphs"
    torch._dynamo.reset()


def test_gather_flat_takes_mixed_dtypes_and_devices():
    parts = [torch.tensor([0.5, 1.0], dtype=torch.bfloat16), torch.tensor([0.25], dtype=torch.float16),
             torch.tensor([2.0, 3.0], dtype=torch.float64)]
    if torch.cuda.device_count() > 1:  # a model spread with device_map="auto"
        parts = [p.to(f"cuda:{i % torch.cuda.device_count()}") for i, p in enumerate(parts)]
    flat = gather_flat(parts)
    assert flat.device.type == "cpu" and flat.dtype == torch.float32
    assert flat.tolist() == [0.5, 1.0, 0.25, 2.0, 3.0]


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gates_on_two_gpus_reallocate():
    model = build("llama")
    layers = model.l1ra_state.layers
    for i, (_, layer) in enumerate(layers):  # half the adapters on each GPU, as device_map="auto" may place them
        layer.to(f"cuda:{i * 2 // len(layers)}")
    kill_gates(model)
    assert l1ra.reallocate(model, None).moved > 0


@pytest.mark.parametrize("name", ["AdamW", "PagedAdamW", "AdamW8bit", "PagedAdamW8bit"])
def test_bitsandbytes_adamw_keeps_survivors_resets_changed_slots_and_seeds(name):
    """bitsandbytes' CPU optimizers run here (paged ones fall back to unpaged on CPU). 32-bit state1/state2: exact,
    like torch's. 8-bit blockwise state (min_8bit_size=0 forces it on these tiny tensors): dequantize, edit, requantize:
    survivors are kept up to one requantization."""
    bnb = pytest.importorskip("bitsandbytes")
    import warnings

    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    model, batch = build("llama", l1ra_lambda=0.0), make_batch("llama")
    opt = l1ra.create_optimizer(model, lr=1e-2, optimizer_cls=getattr(bnb.optim, name), min_8bit_size=0)
    model.train()
    for _ in range(3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    layer = model.l1ra_state.layers[0][1]
    b = layer.lora_B["default"].weight
    eight = opt.state[b]["state1"].dtype == torch.uint8
    assert eight == name.endswith("8bit")
    from l1ra.optim import _bnb_edit_  # noqa: F401  (the 8-bit path)
    import bitsandbytes.functional as F

    def moments(p):
        st = opt.state[p]
        if not eight:
            return st["state1"].clone(), st["state2"].clone()
        return tuple(F.dequantize_blockwise(st[f"state{i}"], absmax=st[f"absmax{i}"], code=st[f"qmap{i}"],
                                            blocksize=256).view(p.shape).clone() for i in (1, 2))

    before = moments(b)
    with torch.no_grad():
        l1ra.gates(model)[model.l1ra_state.layers[0][0]][1] = 0.0
    objects = {k: v for k, v in opt.state[b].items()}
    l1ra.reallocate(model, opt)
    after = moments(b)
    assert all(opt.state[b][k] is v for k, v in objects.items())
    keep = [0, 2, 3]
    for old, new in zip(before, after):
        if eight:  # bitsandbytes' CPU quantizer maps 0 to its nearest code, ~1e-5 of the block's absmax
            assert float(new[:, 1].abs().max()) <= 1e-4 * float(old.abs().max())
        else:
            assert not new[:, 1].any()
        if eight:
            torch.testing.assert_close(new[:, keep], old[:, keep], rtol=0.05, atol=1e-6)
        else:
            assert torch.equal(new[:, keep], old[:, keep])
    # The receiver's revived B column is seeded at its first gradient: its first update is a fresh Adam's (~lr).
    receiver, slot = next((n, s) for n, s in l1ra.live_slots(model).items() if len(s) > 4)
    rb = dict(model.l1ra_state.layers)[receiver].lora_B["default"].weight
    prev = rb.detach().clone()
    model(**batch).loss.backward()
    opt.step()
    step = (rb.detach() - prev)[:, slot[-1]].abs().max() / 1e-2
    assert 0.5 <= float(step) <= 1.5, float(step)
