"""L1RA under FSDP2 (`fully_shard` on each decoder layer and on the root PeftModel) in a plain loop, 2 gloo processes
on CPU, against one process without FSDP on the same global batch (fsdp_worker.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from procs import HERE, ROOT, env, free_port

pytestmark = pytest.mark.slow  # starts several processes

WORKER = HERE / "fsdp_worker.py"
REFUSAL = "l1ra does not support FSDP (the model contains FSDP"


class FSDPRefused(AssertionError):
    """The worker trained until `after_optimizer_step` and l1ra refused FSDP there (main before issue 21)."""


def run_worker(out: Path, *args: str, nproc: int = 0, timeout: int = 240) -> Path:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
              "--master_port", str(free_port())] if nproc else [sys.executable]
    cmd = [*launch, str(WORKER), "train", "--out", str(out), *(["--fsdp"] if nproc else []), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and REFUSAL in proc.stderr:
        raise FSDPRefused("l1ra refused FSDP2 at after_optimizer_step (training ran until there)")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs started on first use and shared by the tests of this module (each costs 15-30 s on 2 CPU cores)."""
    root, done = tmp_path_factory.mktemp("fsdp"), {}
    recipes = {
        "fsdp": dict(nproc=2),
        "single": dict(nproc=0),
        "fsdp-stopped": dict(nproc=2, args=("--save-at", "7")),
    }

    def get(name: str) -> Path:
        if name not in done:
            if name == "fsdp-resumed":
                ckpt = get("fsdp-stopped") / "ckpt"
                done[name] = run_worker(root / name, "--resume", str(ckpt), nproc=2)
            else:
                recipe = recipes[name]
                done[name] = run_worker(root / name, *recipe.get("args", ()), nproc=recipe["nproc"])
        return done[name]

    return get


def results(out: Path) -> list[tuple[dict, dict]]:
    world = 2 if (out / "result-rank1.json").exists() else 1
    return [(json.loads((out / f"result-rank{r}.json").read_text()), load_file(str(out / f"result-rank{r}.safetensors")))
            for r in range(world)]


def assert_tensors_close(got: dict, want: dict, tol: float) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=tol, atol=tol, msg=lambda m, k=k: f"{k}: {m}")


def test_two_fsdp2_processes_match_one_process(runs):
    sharded, single = results(runs("fsdp")), results(runs("single"))
    (info, weights), (info1, weights1) = sharded
    assert info["world"] == 2 and info["is_dtensor"] == "DTensor"
    assert info1["ranks"] == info["ranks"] and info1["history"] == info["history"]
    assert_tensors_close(weights1, weights, 0.0)  # both processes hold the same full tensors
    assert info["reallocations"] >= 4 and info["step"] == 12
    moved = [sum(e["added"].values()) for e in info["history"]]
    assert sum(m > 0 for m in moved) >= 2, f"ranks must move at several reallocations: {moved}"
    (ref, ref_weights), = single
    assert ref["ranks"] == info["ranks"] and ref["history"] == info["history"]
    assert_tensors_close(weights, ref_weights, 1e-4)


def test_fsdp2_save_pretrained_is_a_plain_peft_adapter(runs):
    out = runs("fsdp")
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    # save_pretrained(dir) on every process and save_pretrained(dir, state_dict=<full state dict>) agree
    assert_tensors_close(load_file(str(out / "adapter-fullsd" / "adapter_model.safetensors")), adapter, 0.0)
    # and so does save_pretrained(dir, state_dict=...) called on rank 0 alone (Trainer.save_model under FSDP)
    assert_tensors_close(load_file(str(out / "adapter-rank0" / "adapter_model.safetensors")), adapter, 0.0)
    for name in ("l1ra_state.safetensors", "adapter_config.json"):
        assert (out / "adapter-rank0" / name).read_bytes() == (out / "adapter" / name).read_bytes(), name
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    info = results(out)[0][0]
    assert config["rank_pattern"] == info["ranks"]
    for name, rank in info["ranks"].items():  # live ranks only, in PEFT's shapes
        assert adapter[f"base_model.model.{name}.lora_A.weight"].shape[0] == rank
        assert adapter[f"base_model.model.{name}.lora_B.weight"].shape[1] == rank
    # the one-process run saved the same adapter
    single = load_file(str(runs("single") / "adapter" / "adapter_model.safetensors"))
    assert_tensors_close(adapter, single, 1e-4)
    # plain PEFT, in a fresh process that never imports l1ra, gives the logits the sharded model gave
    peft_logits = out / "peft-logits.pt"
    cmd = [sys.executable, str(WORKER), "peft-logits", "--adapter", str(out / "adapter"), "--out", str(peft_logits)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    torch.testing.assert_close(torch.load(peft_logits), torch.load(out / "logits.pt"), rtol=1e-5, atol=1e-5)


def test_fsdp2_resume_equals_uninterrupted_run(runs):
    """Stop after step 7 (adapter via save_pretrained, optimizer via torch.distributed.checkpoint's full state dict),
    new processes: l1ra.from_pretrained(..., is_trainable=True), fully_shard, load the optimizer, run to step 12."""
    stopped = runs("fsdp-stopped")
    saved = json.loads((stopped / "ckpt" / "l1ra_state.json").read_text())
    assert saved["step"] == 7 and saved["reallocations"] == 2
    resumed, full = results(runs("fsdp-resumed")), results(runs("fsdp"))
    for (info, weights), (want, want_weights) in zip(resumed, full):
        assert info["ranks"] == want["ranks"] and info["history"] == want["history"]
        assert info["step"] == want["step"] == 12
        assert_tensors_close(weights, want_weights, 1e-6)
