"""Saved adapters are plain PEFT LoRA: vanilla PEFT loads them (in a process that never imports l1ra)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import l1ra

from conftest import make_batch, make_model
from test_core import build, kill_gates, logits, train_steps

TESTS_DIR = Path(__file__).parent


def trained(arch, tmp_path):
    model = build(arch, update_every=2, l1ra_lambda=0.0)
    batch = make_batch(arch)
    opt = train_steps(model, batch, 3, hook=False)
    kill_gates(model, 0.4)
    l1ra.reallocate(model, opt)
    train_steps(model, batch, 1, opt, hook=False)
    kill_gates(model, 0.2, seed=3)  # unpruned zero gates: their A rows vanish from the folded export
    return model, batch


@pytest.mark.slow
def test_vanilla_peft_loads_every_arch_with_the_same_logits(tmp_path):
    expected = {}
    for arch in ("llama", "gpt2", "bert"):
        model, batch = trained(arch, tmp_path)
        model.save_pretrained(tmp_path / arch)
        expected[arch] = logits(model, batch)
        torch.save({"batch": batch, "logits": expected[arch]}, tmp_path / f"{arch}.pt")
        cfg = json.loads((tmp_path / arch / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA"
        assert cfg["rank_pattern"] == l1ra.rank_pattern(model)
        assert len(set(cfg["rank_pattern"].values())) > 1, "ranks moved"
        weights = load_file(tmp_path / arch / "adapter_model.safetensors")
        assert not any("l1ra_gate" in k for k in weights)
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(TESTS_DIR)!r})
        from conftest import make_model
        from peft import PeftModel
        worst = 0.0
        for arch in ("llama", "gpt2", "bert"):
            ref = torch.load({str(tmp_path)!r} + f"/{{arch}}.pt")
            model = PeftModel.from_pretrained(make_model(arch), {str(tmp_path)!r} + "/" + arch).eval()
            inputs = {{k: v for k, v in ref["batch"].items() if k != "labels"}}
            with torch.no_grad():
                worst = max(worst, (model(**inputs).logits - ref["logits"]).abs().max().item())
        assert "l1ra" not in sys.modules
        print(worst)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-5


def test_l1ra_checkpoint_restores_raw_weights_gates_and_history(tmp_path):
    model, batch = trained("llama", tmp_path)
    model.save_pretrained(tmp_path / "ckpt")
    restored = l1ra.model.from_pretrained(make_model("llama"), tmp_path / "ckpt", is_trainable=True)
    assert l1ra.rank_pattern(restored) == l1ra.rank_pattern(model)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k  # raw A (rows behind zero gates too) and gates, bit for bit
    assert l1ra.rank_history(restored).to_json() == l1ra.rank_history(model).to_json()
    assert restored.l1ra_state.step == model.l1ra_state.step
    assert restored.l1ra_state.reallocations == model.l1ra_state.reallocations
    torch.testing.assert_close(logits(restored, batch), logits(model, batch))
    # and it keeps training with reallocations
    train_steps(restored, batch, 2)


def test_load_adapter_accepts_a_plain_lora_adapter(tmp_path):
    """An L1RA model can start from any LoRA adapter with per-module ranks (gates start at 1)."""
    model, batch = trained("gpt2", tmp_path)
    model.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "l1ra_state.json").unlink()
    fresh = build("gpt2")
    fresh.load_adapter(tmp_path / "a", "default", is_trainable=True)
    assert l1ra.rank_pattern(fresh) == l1ra.rank_pattern(model)
    torch.testing.assert_close(logits(fresh, batch), logits(model, batch), atol=1e-5, rtol=0)


def test_save_is_atomic_a_failed_save_leaves_the_previous_files(tmp_path, monkeypatch):
    model, _ = trained("llama", tmp_path)
    model.save_pretrained(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    train_steps(model, make_batch("llama"), 1, l1ra.create_optimizer(model, lr=1e-2), hook=False)

    import l1ra.checkpoint as export

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "ckpt")
    after = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    assert after == before, "nothing already saved is overwritten, no temp files left"
