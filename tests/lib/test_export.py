"""Saved adapters and checkpoints: L1RA state restored, plain LoRA adapters accepted, atomic saves. Vanilla PEFT loading
them in a process that never imports l1ra: tests/integration/test_vanilla_peft.py."""

import pytest
import torch

import l1ra
from l1ra import L1RAConfig

from conftest import make_batch, make_model
from helpers import build, logits, train_steps, trained


def test_l1ra_checkpoint_restores_raw_weights_gates_and_history(tmp_path):
    model, batch = trained("llama")
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
    model, batch = trained("gpt2")
    model.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "l1ra_state.json").unlink()
    fresh = build("gpt2")
    fresh.load_adapter(tmp_path / "a", "default", is_trainable=True)
    assert l1ra.rank_pattern(fresh) == l1ra.rank_pattern(model)
    torch.testing.assert_close(logits(fresh, batch), logits(model, batch), atol=1e-5, rtol=0)


def test_save_is_atomic_a_failed_save_leaves_the_previous_files(tmp_path, monkeypatch):
    model, _ = trained("llama")
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


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
@pytest.mark.parametrize("adapter", ["default", "mine"])
def test_saved_files_follow_the_umask(tmp_path, umask, mode, adapter):
    import os
    import stat

    model = l1ra.get_l1ra_model(make_model("llama"), L1RAConfig(r=4, target_modules="all-linear"), adapter_name=adapter)
    old = os.umask(umask)
    try:
        model.save_pretrained(tmp_path / "out")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"adapter_model.safetensors", "l1ra_state.safetensors", "l1ra_state.json"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == mode, (path.name, oct(stat.S_IMODE(path.stat().st_mode)))
