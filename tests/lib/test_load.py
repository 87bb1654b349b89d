"""Loading reproduces the saved function, whatever lora_alpha, alpha_pattern and use_rslora the adapter was saved
with; an adapter of another kind is refused naming the field (issue 10)."""

from __future__ import annotations

import pytest
import torch

import l1ra

from conftest import make_batch, make_model
from helpers import build, kill_gates, logits, train_steps


Q0 = "model.layers.0.self_attn.q_proj"
SAVED_SCALINGS = {
    "alpha32": dict(lora_alpha=32),
    "alpha32_rslora": dict(lora_alpha=32, use_rslora=True),
    "alpha_pattern": dict(lora_alpha=8, rank_pattern={Q0: 6}, alpha_pattern={Q0: 2, "mlp.down_proj": 40}),
    "alpha_pattern_rslora": dict(lora_alpha=16, use_rslora=True, rank_pattern={Q0: 2}, alpha_pattern={"v_proj": 3}),
}


def _plain_peft_adapter(path, **lora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    config = LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False, **lora)
    peft_model = get_peft_model(make_model("llama"), config)
    peft_model.save_pretrained(path)
    return logits(peft_model, make_batch("llama"))


@pytest.mark.parametrize("saved", list(SAVED_SCALINGS))
@pytest.mark.parametrize("model_rslora", [False, True])
def test_load_adapter_reproduces_plain_peft_logits_whatever_alpha_and_rslora(tmp_path, saved, model_rslora):
    expected = _plain_peft_adapter(tmp_path / "peft", **SAVED_SCALINGS[saved])
    model = build("llama", lora_alpha=8, use_rslora=model_rslora)  # built with other scaling settings
    model.load_adapter(str(tmp_path / "peft"), "default", is_trainable=True)
    torch.testing.assert_close(logits(model, make_batch("llama")), expected, atol=1e-6, rtol=0)
    # Saved again, vanilla PEFT reads the same function back (the alpha_pattern carries each module's scaling).
    from peft import PeftModel

    model.save_pretrained(tmp_path / "again")
    again = PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "again"))
    torch.testing.assert_close(logits(again, make_batch("llama")), expected, atol=1e-6, rtol=0)


def test_resume_reproduces_the_saved_scaling(tmp_path):
    saved = build("llama", lora_alpha=32, use_rslora=True, update_every=1)
    train_steps(saved, make_batch("llama"), 2, hook=False)
    kill_gates(saved, 0.4)
    l1ra.reallocate(saved)
    saved.save_pretrained(tmp_path / "ckpt")
    resumed = build("llama", lora_alpha=8)
    resumed.load_adapter(str(tmp_path / "ckpt"), "default", is_trainable=True)
    torch.testing.assert_close(logits(resumed, make_batch("llama")), logits(saved, make_batch("llama")), atol=1e-6, rtol=0)


def test_an_adapter_of_another_kind_is_refused_naming_the_field(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(make_model("llama"), LoraConfig(r=4, target_modules="all-linear", lora_bias=True)).save_pretrained(tmp_path / "b")
    with pytest.raises(l1ra.CheckpointError, match="lora_bias=True but this model has lora_bias=False"):
        build("llama").load_adapter(str(tmp_path / "b"), "default")
