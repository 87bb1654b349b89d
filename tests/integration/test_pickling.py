"""Gated layers survive pickling: a model saved with torch.save loads in a fresh Python process and gives the same
logits (issue 10)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_batch
from helpers import gated_trained, logits


@pytest.mark.slow
def test_gated_layers_survive_pickling_into_a_fresh_process(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    model, batch = gated_trained(), make_batch("gpt2")
    torch.save({"model": model, "batch": batch, "logits": logits(model, batch)}, tmp_path / "m.pt")
    code = (
        "import sys, torch; import l1ra.model; sys.path.insert(0, %r); "
        "d = torch.load(%r, weights_only=False); m = d['model'].eval(); "
        "x = {k: v for k, v in d['batch'].items() if k != 'labels'}; "
        "print(type(m).__name__, float((m(**x).logits - d['logits']).abs().max()))"
    ) % (str(Path(__file__).resolve().parents[1]), str(tmp_path / "m.pt"))  # tests/, for conftest
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    name, diff = out.stdout.split()[-2:]
    assert name == "L1RAPeftModelForCausalLM" and float(diff) == 0.0

