"""4-bit NF4 bases (QLoRA) through bitsandbytes, whose CPU backend runs here: train, reallocate, save, load in plain
PEFT, and TRL's SFTTrainer keeps the gates fp32 (issue 10). `l1ra train --load-in-4bit`: tests/app/test_cli.py."""

from __future__ import annotations

import pytest
import torch

import l1ra
from l1ra import L1RAConfig

from conftest import make_batch, make_model
from helpers import kill_gates, logits, train_steps


def _nf4_base(directory):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=quant, device_map="cpu")


def test_a_4bit_base_trains_reallocates_saves_and_loads_in_plain_peft(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    make_model("llama64").save_pretrained(tmp_path / "base")  # 4-bit shapes every CPU kernel takes
    model = l1ra.get_l1ra_model(
        _nf4_base(tmp_path / "base"),
        L1RAConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM", update_every=10**6, l1ra_lambda=0.0),
    )
    layer = model.l1ra_state.layers[0][1]
    assert type(layer.get_base_layer()).__name__ == "Linear4bit"
    assert all(g.dtype == torch.float32 for g in l1ra.gates(model).values())
    batch = make_batch("llama")
    opt = train_steps(model, batch, 2)
    kill_gates(model, 0.5)
    before = logits(model, batch)
    assert l1ra.reallocate(model, opt).moved > 0
    after = logits(model, batch)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    train_steps(model, batch, 1, opt)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    plain = PeftModel.from_pretrained(_nf4_base(tmp_path / "base"), str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(plain, batch), expected, atol=1e-5, rtol=0)
    # Merging into a 4-bit base re-quantizes W + delta (PEFT warns): close, not exact. For an exact merge, load the
    # base in full precision and merge the saved adapter there.
    assert all(layer.get_delta_weight("default").abs().sum() > 0 for _, layer in model.l1ra_state.layers)
    model.merge_adapter()
    assert (logits(model, batch) - expected).abs().max() < 0.2

def test_trl_sfttrainer_on_a_4bit_base_keeps_the_gates_fp32(tiny_llm_4bit, tmp_path):
    """A user's own QLoRA loop: TRL's SFTTrainer casts a quantized model's trainable parameters to bf16; the
    callback casts the gates back when the Trainer is built, before any DDP wrap (the LoRA factors stay as TRL
    chose), so the L1 steps are exact."""
    pytest.importorskip("bitsandbytes")
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_llm_4bit)
    model = l1ra.get_l1ra_model(_nf4_base(tiny_llm_4bit), L1RAConfig(r=4, target_modules="all-linear",
                                                                 task_type="CAUSAL_LM", update_every=2,
                                                                 l1ra_lambda=60.0))
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}."} for i in range(16)]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                     report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, bf16=False,
                     **{("activation_checkpointing" if "activation_checkpointing" in SFTConfig.__dataclass_fields__
                         else "gradient_checkpointing"): False})
    callback = l1ra.L1RACallback()
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                         optimizers=(l1ra.create_optimizer(model, lr=1e-3), None), callbacks=[callback])
    assert {g.dtype for g in l1ra.gates(model).values()} == {torch.float32}  # TRL's bf16 cast undone in on_init_end
    trainer.train()
    assert {g.dtype for g in l1ra.gates(model).values()} == {torch.float32}
    assert sum(e.moved for e in callback.events) > 0  # the L1 pruned ranks and they were handed on
