"""The CLI run in a fresh Python process, where only a fresh process can tell: what `--help` and argument errors
import, missing extras and packages named at start-up before any work (modules blocked as if not installed), the
base install's commands, l1ra's own warnings reaching stderr while transformers' noise does not, and a `.gguf` model
of an unsupported architecture named from its header alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import l1ra
from l1ra.app import assets
from helpers import TRAIN_FLAGS, write_gguf

pytestmark = pytest.mark.slow  # every test starts a Python process

SRC = str(Path(l1ra.__file__).resolve().parents[1])
TESTS = str(Path(__file__).resolve().parents[1])  # conftest.py and helpers.py
HEAVY = ("torch", "transformers", "peft", "datasets", "accelerate", "safetensors", "matplotlib", "yaml", "gguf", "trl",
         "numpy")
# What `pip install l1ra` does not bring (the base install's own dependencies bring yaml, tqdm, numpy, psutil).
NOT_IN_BASE = ("datasets", "matplotlib", "gguf", "sentencepiece", "trl")


def _python(code: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, TESTS, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)

def _block(modules) -> str:
    # `import m` raises ModuleNotFoundError and find_spec(m) is None: the package is not installed, as far as
    # Python (and the real start-up check) can tell.
    return f"import sys\nfor _m in {tuple(modules)!r}:\n    sys.modules[_m] = None\n"

def test_help_and_argument_errors_import_nothing_heavy():
    code = """
        import json, sys
        from l1ra.app.cli import main
        codes = []
        for argv in (["--help"], ["train", "--help"], ["train", "--lr", "x"], ["train", "--preset", "nope"],
                     ["report"], ["merge", "--help"], []):
            try:
                codes.append(main(argv))
            except SystemExit as exc:
                codes.append(exc.code)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[1].split(","))
        library = sorted(m for m in sys.modules if m.startswith("l1ra.") and not m.startswith("l1ra.app"))
        print(json.dumps({"codes": codes, "heavy": heavy, "library": library,
                          "app": sorted(m for m in sys.modules if m.startswith("l1ra.app."))}))
    """
    out = _python(code, ",".join(HEAVY))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["codes"] == [0, 0, 2, 2, 2, 0, 2]
    assert got["heavy"] == [] and got["library"] == []
    # only the commands asked for (train, report, merge), each its command line alone
    assert set(got["app"]) == {"l1ra.app.cli", "l1ra.app.console", "l1ra.app.errors", "l1ra.app.extras",
                               "l1ra.app.lazy", "l1ra.app.schedule", "l1ra.app.train", "l1ra.app.train.command",
                               "l1ra.app.train.options", "l1ra.app.deploy", "l1ra.app.deploy.command"}, got["app"]

def test_report_to_tensorboard_without_its_package_fails_at_start_up(tmp_path):
    out = tmp_path / "out"
    code = _block(["tensorboard", "tensorboardX"]) + f"""
from l1ra.app.cli import main
rc = main(["train", "--report-to", "tensorboard", "--output-dir", {str(out)!r}])
print("RC", rc, "torch" in sys.modules)
"""
    res = _python(code)
    assert res.stdout.split()[-3:] == ["RC", "2", "False"], res.stdout + res.stderr
    assert ("l1ra: error: --report-to tensorboard needs the 'tensorboard' package, not installed; install it with: "
            "pip install 'l1ra[tensorboard]'") in res.stderr
    assert not out.exists()

@pytest.mark.parametrize("command", ["train", "report", "compare"])
def test_a_command_without_its_extra_fails_before_any_work(command, tmp_path):
    out = tmp_path / "out"
    argv = {"train": ["train", "--output-dir", str(out)], "report": ["report", str(tmp_path)],
            "compare": ["compare", "--task", "tiny", "--quick", "--output-dir", str(out)]}[command]
    code = _block(NOT_IN_BASE) + f"""
from l1ra.app.cli import main
rc = main({argv!r})
print("RC", rc, "torch" in sys.modules)
"""
    res = _python(code)
    lines = [line for line in res.stderr.splitlines() if line.startswith("l1ra: error")]
    needed = "matplotlib" if command == "report" else "datasets, matplotlib, gguf, sentencepiece, trl"
    assert lines == [f"l1ra: error: `l1ra {command}` needs {needed}, not installed; install with: "
                     "pip install 'l1ra[train]'"], res.stderr
    rc, torch_loaded = res.stdout.split()[-2:]
    assert rc == "2" and not out.exists()
    if command != "compare":  # compare's module itself imports torch; nothing else ran
        assert torch_loaded == "False"

@pytest.fixture(scope="module")
def tiny_adapter(tiny_llm, tmp_path_factory):
    """A plain PEFT LoRA adapter folder on the tiny Llama (no training)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llm),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tiny_llm)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path

def test_generate_and_merge_need_only_the_base_install(tiny_adapter, tmp_path):
    merged = tmp_path / "merged"
    code = _block(NOT_IN_BASE) + f"""
from l1ra.app.cli import main
assert main(["generate", {str(tiny_adapter)!r}, "hello", "--max-new-tokens", "3"]) == 0
assert main(["merge", {str(tiny_adapter)!r}, "--out", {str(merged)!r}]) == 0
print("OK", sorted(m for m in {NOT_IN_BASE!r} if sys.modules.get(m) is not None))
"""
    res = _python(code)
    assert res.returncode == 0 and res.stdout.strip().splitlines()[-1] == "OK []", res.stdout + res.stderr
    assert (merged / "config.json").is_file()

def test_l1ra_warnings_reach_stderr_during_train(tiny_llm, qa_jsonl, tmp_path):
    # The probe warns from inside the Trainer's callback, as l1ra's own warnings do; stacklevel 3 attributes it to
    # transformers.trainer_callback, so a filter by module would hide it.
    code = f"""
import sys, warnings
import l1ra.callback as cb
real = cb.after_optimizer_step
def probe(*args, **kwargs):
    warnings.warn("l1ra: probe warning from inside the Trainer", stacklevel=3)
    return real(*args, **kwargs)
cb.after_optimizer_step = probe
from l1ra.app.cli import main
sys.exit(main(["train", "--model", {str(tiny_llm)!r}, "--dataset", {str(qa_jsonl)!r},
               "--output-dir", {str(tmp_path / "out")!r}, *{TRAIN_FLAGS!r}, "--max-steps", "2"]))
"""
    res = _python(code)
    assert res.returncode == 0, res.stderr
    assert "UserWarning: l1ra: probe warning from inside the Trainer" in res.stderr
    assert "trainer_callback" in res.stderr.split("l1ra: probe warning")[0].splitlines()[-1]
    # transformers' FutureWarning about `is_gradient_checkpointing` (raised on every PeftModel) is silenced
    assert "FutureWarning" not in res.stderr and "is_gradient_checkpointing" not in res.stderr

def test_unsupported_gguf_architecture_is_named_before_loading_anything(tmp_path):
    odd = write_gguf(tmp_path / "odd.gguf", "notamodel")
    res = _python(f"""
import sys
from l1ra.app.cli import main
rc = main(["train", "--model", {str(odd)!r}, "--output-dir", {str(tmp_path / "out")!r}])
print("RC", rc, "torch" in sys.modules)
""")
    # decided from the file's header and transformers' GGUF tables: no torch, no tensors read
    assert res.stdout.split()[-3:] == ["RC", "2", "False"], res.stdout + res.stderr
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("l1ra: error")]
    assert line.startswith(f"l1ra: error: --model {odd}: GGUF architecture 'notamodel' cannot be read by transformers")
    for arch in ("llama", "gemma3", "qwen2"):
        assert arch in line
    assert not (tmp_path / "out").exists()
    with pytest.raises(assets.AssetError, match="GGUF architecture 'notamodel'"):
        assets.convert_gguf(odd, cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_compare_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, l1ra.app.compare; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_load_in_4bit_without_bitsandbytes_names_the_extra(tmp_path):
    import subprocess
    import sys

    code = ("import sys; sys.modules['bitsandbytes'] = None\n"
            "from l1ra.app.cli import main\n"
            f"sys.exit(main(['train', '--load-in-4bit', '--output-dir', {str(tmp_path / 'o')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--load-in-4bit needs bitsandbytes" in proc.stderr and "pip install 'l1ra[quant]'" in proc.stderr
    assert not (tmp_path / "o").exists()
