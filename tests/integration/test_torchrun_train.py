"""`l1ra train` under torchrun: two real gloo processes on the CPU against one process with the same global batch."""

from __future__ import annotations

import pytest
import json
import subprocess
import sys

from l1ra.app.cli import main
from procs import ROOT, env, free_port

pytestmark = pytest.mark.slow  # starts several processes

# no --r: torchrun's own parser takes `--r` as an abbreviation of its options
FLAGS = ["--max-steps", "4", "--max-length", "48", "--eval-steps", "2", "--save-steps", "2", "--update-every", "2",
         "--max-eval", "4", "--l1ra-lambda", "60"]


def test_two_processes_write_once_print_once_and_count_the_global_batch(tiny_llm, qa_jsonl, tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    # a previous run in the folder: with --overwrite process 0 alone removes it (two processes raced to before)
    (ddp / "checkpoint-9").mkdir(parents=True)
    (ddp / "checkpoint-9" / "adapter_config.json").write_text("{}")
    (ddp / "metrics.json").write_text("{}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "l1ra.app.cli", "train", "--model", str(tiny_llm), "--dataset", str(qa_jsonl), "--output-dir",
           str(ddp), "--batch-size", "2", "--overwrite", *FLAGS]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-6000:]
    err = proc.stderr
    # start-up lines, progress and the summary come from process 0 only
    assert err.count("adapters, budget") == 1 and "steps of 2x1 x 2 processes on cpu" in err, err[-3000:]
    assert err.count("scoring the base model") == 1 and err.count("train step 4/4") == 1, err[-3000:]
    # every line l1ra prints comes once (the L1 reach, a data note, ...), and so does every warning
    said = [line for line in err.splitlines() if line.startswith("l1ra:") or "Warning:" in line]
    assert said and len(said) == len(set(said)), "\n".join(said)
    assert proc.stdout.count("held-out loss: base") == 1, proc.stdout
    for name in ("adapter/adapter_model.safetensors", "metrics.json", "rank_history.json", "train_config.json",
                 "summary.txt", "rank_heatmap.png", "loss_curves.png"):
        assert (ddp / name).is_file(), name
    assert not (ddp / "checkpoint-9").exists() and not list(ddp.glob(".*")), sorted(p.name for p in ddp.iterdir())

    # one process, the same global batch (2 processes x 2 = 4): the same batches, so the same token count
    assert main(["train", "--model", str(tiny_llm), "--dataset", str(qa_jsonl), "--output-dir", str(single),
                 "--batch-size", "4", *FLAGS]) == 0
    m2, m1 = (json.loads((d / "metrics.json").read_text()) for d in (ddp, single))
    assert [round(v, 4) for _, v in m2["curves"]["train"]] == [round(v, 4) for _, v in m1["curves"]["train"]]
    assert m2["train_tokens"] == m1["train_tokens"] > 0  # was half: each process counted its own share
    assert m2["status"] == "finished" and m2["steps"] == 4
