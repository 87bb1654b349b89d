"""Kill-and-resume: a Trainer run killed with SIGKILL between two checkpoints and resumed from the last one ends exactly
where an uninterrupted run ends (ranks, rank history, adapter weights, with dropout on: RNG states restored)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import l1ra
from conftest import make_batch, make_model
from procs import HERE, ROOT, env as process_env

WORKER = HERE / "l1ra_worker.py"

STEPS, SAVE_STEPS, KILL_AT = 18, 6, 14  # checkpoints at 6, 12, 18; reallocations every 3 steps (one at 12 and 15)


def _trainer_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(WORKER), "trainer", "--out", str(out), "--steps", str(STEPS),
            "--save-steps", str(SAVE_STEPS), *extra]


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume_equals_uninterrupted_run(tmp_path):
    full_out, killed_out = tmp_path / "full", tmp_path / "killed"
    env = process_env()
    # The uninterrupted run and the run to be killed start together (the second one mostly waits to be killed).
    full = subprocess.Popen(_trainer_cmd(full_out), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    victim = subprocess.Popen(
        _trainer_cmd(killed_out, "--stop-after", str(KILL_AT)), cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        marker = killed_out / "stopped"
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert victim.poll() is None, "the training process ended before it reached the kill point"
            assert time.monotonic() < deadline, "the training process never reached the kill point"
            time.sleep(0.2)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=60) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
    ckpts = sorted(p.name for p in (killed_out / "ckpt").iterdir())
    assert ckpts == ["checkpoint-12", "checkpoint-6"], ckpts  # killed after 12, before 18
    last = killed_out / "ckpt" / "checkpoint-12"
    saved = json.loads((last / "l1ra_state.json").read_text())
    assert saved["step"] == 12 and saved["reallocations"] == 4

    resumed = subprocess.run(
        _trainer_cmd(killed_out, "--resume", str(last)), cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    out, _ = full.communicate(timeout=240)
    assert full.returncode == 0, out[-6000:]

    full_info = json.loads((full_out / "result-rank0.json").read_text())
    info = json.loads((killed_out / "result-rank0.json").read_text())
    assert info["optimizer_holds_model_params"], "after resume the optimizer must train the model's own parameters"
    assert sum(sum(e["added"].values()) for e in full_info["history"] if e["step"] > 12) > 0, "ranks move after resume"
    assert info["history"] == full_info["history"]
    assert info["ranks"] == full_info["ranks"]
    assert (info["step"], info["reallocations"]) == (full_info["step"], full_info["reallocations"])
    full_w = load_file(str(full_out / "result-rank0.safetensors"))
    w = load_file(str(killed_out / "result-rank0.safetensors"))
    assert w.keys() == full_w.keys()
    for k in w:
        torch.testing.assert_close(w[k], full_w[k], rtol=0, atol=1e-6)
    # The final checkpoints match too, and L1RA's own files are safetensors/JSON only.
    final, full_final = killed_out / "ckpt" / "checkpoint-18", full_out / "ckpt" / "checkpoint-18"
    for name in ("adapter_model.safetensors", "l1ra_state.safetensors"):
        a, b = load_file(str(final / name)), load_file(str(full_final / name))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    l1ra_files = {p.name for p in final.iterdir() if p.name.startswith(("adapter_", "l1ra_"))}
    assert l1ra_files == {"adapter_config.json", "adapter_model.safetensors", "l1ra_state.json", "l1ra_state.safetensors"}


def _trained_checkpoint(tmp_path):
    cfg = l1ra.L1RAConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM", update_every=1)
    model = l1ra.get_l1ra_model(make_model("llama", seed=0), cfg)
    with torch.no_grad():
        for i, gate in enumerate(l1ra.gates(model).values()):
            if i % 2 == 0:
                gate[:2] = 0.0
    l1ra.reallocate(model)
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt", cfg


def test_loading_writes_in_place_so_an_optimizer_built_before_the_load_trains_the_loaded_adapter(tmp_path):
    """What Trainer(resume_from_checkpoint=) does: the optimizer exists before load_adapter. The adapters have fixed
    capacity shapes, so the load writes values into the same tensors and nothing needs re-pointing."""
    saved, ckpt, cfg = _trained_checkpoint(tmp_path)
    model = l1ra.get_l1ra_model(make_model("llama", seed=0), cfg)
    opt = l1ra.create_optimizer(model, lr=1e-2)
    before = {n: (id(p), p.data_ptr()) for n, p in model.named_parameters() if p.requires_grad}
    model.load_adapter(str(ckpt), "default", is_trainable=True)
    assert l1ra.rank_pattern(model) == l1ra.rank_pattern(saved)
    assert l1ra.live_slots(model) == l1ra.live_slots(saved)
    assert model.l1ra_state.pending == saved.l1ra_state.pending
    assert {n: (id(p), p.data_ptr()) for n, p in model.named_parameters() if p.requires_grad} == before
    for (name, p), (_, q) in zip(model.named_parameters(), saved.named_parameters()):
        assert torch.equal(p, q), name
    model.train()
    model(**make_batch("llama")).loss.backward()
    opt.step()
    l1ra.after_optimizer_step(model, opt)
