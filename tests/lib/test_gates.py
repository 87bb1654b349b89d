"""The gates: merging and unmerging with them, PEFT's delta-weight paths include them, and they stay fp32 with bf16
adapters (issue 10). Pickling into a fresh process: tests/integration/test_pickling.py."""

from __future__ import annotations

import pytest
import torch

import l1ra
from l1ra import L1RAConfig

from conftest import make_batch, make_model
from helpers import build, gated_trained, kill_gates, logits, train_steps


# ---------------------------------------------------------------------------------------------------------------
# 3. Merging with the gates


def _raw(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k or "l1ra_gate" in k}


def test_merge_twice_then_unmerge_restores_gates_and_weights():
    model, batch = gated_trained(), make_batch("gpt2")
    expected, raw = logits(model, batch), _raw(model)
    base = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    model.merge_adapter()
    model.merge_adapter()  # PEFT skips an adapter that is already merged
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    for k, v in _raw(model).items():
        assert torch.equal(v, raw[k]), k
    for k, v in model.state_dict().items():
        if k in base:
            torch.testing.assert_close(v, base[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_paths_that_read_the_delta_weight_include_the_gate(arch):
    model, batch = gated_trained(arch), make_batch(arch)
    expected = logits(model, batch)
    st = model.l1ra_state
    for name, layer in st.layers:
        x = torch.randn(3, layer.in_features)
        delta = layer.get_delta_weight(st.adapter)
        y = x @ delta if getattr(layer, "fan_in_fan_out", False) else x @ delta.T
        with torch.no_grad():
            torch.testing.assert_close(y, layer(x) - layer.base_layer(x), atol=1e-6, rtol=0)
    model.base_model.merge_adapter()  # PEFT's own merge, below the PeftModel
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    model.base_model.unmerge_adapter()
    merged = model.base_model.merge_and_unload()
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=0)

# ---------------------------------------------------------------------------------------------------------------
# 6. Gates stay fp32 with bf16 adapters


def _bf16_model(**overrides):
    kwargs = dict(r=4, target_modules="all-linear", task_type="CAUSAL_LM", l1ra_lambda=0.1, eta_c=0.02, update_every=10**6)
    kwargs.update(overrides)
    base = make_model("llama").to(torch.bfloat16)
    return l1ra.get_l1ra_model(base, L1RAConfig(**kwargs), autocast_adapter_dtype=False)


def test_gates_are_fp32_with_bf16_adapters_and_the_proximal_step_is_exact():
    model = _bf16_model()
    layer = model.l1ra_state.layers[0][1]
    assert layer.lora_A["default"].weight.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in l1ra.gates(model).values())
    opt = l1ra.create_optimizer(model, lr=1e-3)
    for _ in range(50):  # tau = 0.02 * 0.1 = 2e-3 per step
        l1ra.after_optimizer_step(model, opt)
    live = l1ra.live_slots(model)
    for name, gate in l1ra.gates(model).items():  # live slots; dead ones stay at 0
        expected = torch.zeros_like(gate).index_fill_(0, torch.tensor(live[name]), 0.9)
        torch.testing.assert_close(gate.detach(), expected, atol=1e-5, rtol=0)  # bf16 gave 0.805
    l1ra.after_optimizer_step(model, opt, step=51)  # and a tau far below a bf16 step near 1 still acts
    small = _bf16_model(l1ra_lambda=1e-3)  # tau = 2e-5 < half a bf16 step at 1 (2**-9)
    l1ra.after_optimizer_step(small, l1ra.create_optimizer(small, lr=1e-3))
    assert all(bool((g < 1).all()) for g in l1ra.gates(small).values())  # live ones moved, dead ones are 0


def test_bf16_adapters_train_reallocate_and_round_trip_with_fp32_gates(tmp_path):
    model, batch = _bf16_model(l1ra_lambda=0.0), make_batch("llama")
    opt = train_steps(model, batch, 2, hook=False)
    assert all(g.grad is None or g.grad.dtype == torch.float32 for g in l1ra.gates(model).values())
    assert any(opt.state[g] for g in l1ra.gates(model).values()), "the gates trained"
    kill_gates(model, 0.5)
    l1ra.reallocate(model, opt)
    assert all(g.dtype == torch.float32 for g in l1ra.gates(model).values())
    train_steps(model, batch, 1, opt)
    model.save_pretrained(tmp_path / "ckpt")
    restored = l1ra.model.from_pretrained(make_model("llama").to(torch.bfloat16), tmp_path / "ckpt", is_trainable=True)
    for name, gate in l1ra.gates(restored).items():
        assert gate.dtype == torch.float32 and torch.equal(gate, l1ra.gates(model)[name])


def test_gates_cast_after_wrapping_are_refused():
    model = build("llama").to(torch.bfloat16)
    with pytest.raises(ValueError, match="gates are torch.bfloat16, not float32"):
        l1ra.after_optimizer_step(model, l1ra.create_optimizer(model, lr=1e-3))
