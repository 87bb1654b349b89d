"""What get_l1ra_model refuses and accepts: a second adapter, whichever way it comes in, and the init_lora_weights
variants (issue 10)."""

from __future__ import annotations

import pytest
import torch

import l1ra
from l1ra import L1RAConfig

from conftest import make_batch, make_model
from helpers import build, kill_gates, logits, train_steps


# ---------------------------------------------------------------------------------------------------------------
# 4. A second adapter is refused, whichever way it comes in


def test_a_second_adapter_is_refused():
    from peft import LoraConfig

    model = build("llama")
    with pytest.raises(ValueError, match="holds one adapter"):
        model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="holds one adapter"):
        model.load_adapter("/nonexistent", "other")
    with pytest.raises(ValueError, match="add_weighted_adapter"):
        model.add_weighted_adapter(["default"], [1.0], "mix")
    assert list(model.peft_config) == ["default"]


def test_an_adapter_added_below_the_peft_model_stops_training_and_saving(tmp_path):
    from peft import LoraConfig

    model = build("llama")
    opt = l1ra.create_optimizer(model, lr=1e-3)
    model.peft_config["other"] = LoraConfig(r=2, target_modules=["q_proj"])
    model.base_model.inject_adapter(model.base_model.model, "other")  # PEFT's lower-level API
    gates_before = {k: v.detach().clone() for k, v in l1ra.gates(model).items()}
    with pytest.raises(ValueError, match="delete_adapter\\('other'\\)"):
        l1ra.after_optimizer_step(model, opt)
    assert all(torch.equal(v, gates_before[k]) for k, v in l1ra.gates(model).items()), "no L1 step was taken"
    with pytest.raises(ValueError, match="holds one adapter"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# 5. init_lora_weights


@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal"])
def test_supported_initialisations_train_reallocate_and_merge(init):
    model, batch = build("llama", init_lora_weights=init), make_batch("llama")
    if init in (True, "gaussian"):  # B = 0: the model starts as its base
        torch.testing.assert_close(logits(model, batch), logits(make_model("llama"), batch), atol=0, rtol=0)
    opt = train_steps(model, batch, 2, hook=False)
    kill_gates(model, 0.5)
    before = logits(model, batch)
    event = l1ra.reallocate(model, opt)
    assert event.moved > 0
    torch.testing.assert_close(logits(model, batch), before, atol=1e-6, rtol=0)
    assert all(len(layer.lora_A["default"]._forward_hooks) == 1 for _, layer in model.l1ra_state.layers)
    train_steps(model, batch, 1, opt)


@pytest.mark.parametrize(
    "init,why",
    [("pissa", "pretrained"), ("pissa_niter_4", "pretrained"), ("olora", "pretrained"), ("corda", "pretrained"),
     ("loftq", "pretrained"), ("lora_ga", "pretrained weight"), ("eva", "drops the L1RA gates"), ("mica", "no gradient"),
     ("bogus", "does not know")],
)
def test_initialisations_that_would_break_l1ra_are_refused_naming_why(init, why):
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' is not supported: .*{why}.*Use one of True"):
        L1RAConfig(r=4, target_modules="all-linear", init_lora_weights=init)
