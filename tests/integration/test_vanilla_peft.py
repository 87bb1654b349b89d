"""Saved adapters are plain PEFT LoRA: vanilla PEFT loads them, with the same logits, in a process that never imports
l1ra (Llama, GPT-2 with Conv1D, BERT)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import l1ra
from helpers import logits, trained

TESTS_DIR = Path(__file__).resolve().parents[1]  # conftest.py, for the fresh process


@pytest.mark.slow
def test_vanilla_peft_loads_every_arch_with_the_same_logits(tmp_path):
    expected = {}
    for arch in ("llama", "gpt2", "bert"):
        model, batch = trained(arch)
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
