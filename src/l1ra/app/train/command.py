"""The command lines of `l1ra train` and `l1ra report`: one flag per `TrainOptions` field, a YAML/JSON config file
with the same keys, and the commands themselves. Light: the recipe (torch, transformers) loads only when a command
runs, after its arguments are parsed and checked."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Optional

from ..console import show_bnb_kernels_note
from ..errors import UserError
from .options import TrainOptions, report_to_list


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _number(value) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None


def _integer(value) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None


_BASE_TYPES = {int: _integer, float: _number, bool: _bool, str: str}


def _field_kind(tp) -> tuple[type, Optional[tuple]]:
    """(base type, choices) of a field annotation: Optional[X] -> X, Literal[...] -> (type of the values, values)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        return _field_kind(args[0])
    if typing.get_origin(tp) is typing.Literal:
        return type(args[0]), tuple(args)
    if tp not in _BASE_TYPES:
        raise TypeError(f"option type {tp!r} has no command-line form")  # a new TrainOptions field needs one
    return tp, None


def dataclass_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one `--flag-name` per field of the dataclass `cls`: type, choices and help from the field.

    What `transformers.HfArgumentParser` does, without importing transformers (about 1 s) before parsing. Every
    flag defaults to None, so `args` tells which options the user gave. Field metadata: "help"; "const" (the flag
    may be given without a value, meaning const); "metavar". A bool field with default False is a switch; an
    Optional[bool] takes an optional true/false (bare flag: true).
    """
    hints = typing.get_type_hints(cls, include_extras=False)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        base, choices = _field_kind(hints[f.name])
        help_text = f.metadata.get("help", "")
        if "(default" not in help_text and f.default not in (None, False, dataclasses.MISSING):
            help_text += f" (default: {f.default})"
        kwargs = dict(default=None, help=help_text)
        if base is bool and f.default is False:
            parser.add_argument(flag, action="store_true", **kwargs)
            continue
        if base is bool:
            kwargs.update(nargs="?", const=True, metavar="BOOL")
        elif "const" in f.metadata:
            kwargs.update(nargs="?", const=f.metadata["const"])
        if choices:
            kwargs["choices"] = choices
        else:
            kwargs["metavar"] = f.metadata.get("metavar", kwargs.get("metavar", f.name.upper()))
        parser.add_argument(flag, type=_BASE_TYPES[base], **kwargs)


def coerce_option(cls, name: str, value):
    """A config-file value converted like the flag's string would be (YAML reads `1e-4` as a string)."""
    base, choices = _field_kind(typing.get_type_hints(cls)[name])
    if value is None:
        return None
    if name == "target_modules" and isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if base is str and isinstance(value, (dict, list)):
        raise argparse.ArgumentTypeError(f"expected a string, got {value!r}")
    value = _BASE_TYPES[base](value)
    if choices and value not in choices:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="fine-tune a model with L1RA (no arguments: SmolLM2-135M-Instruct on GSM8K, offline)",
        usage="%(prog)s [options]",  # the options are listed by --help; a bad flag's error stays two lines
        description="Fine-tune a model with L1RA. With no arguments: SmolLM2-135M-Instruct on GSM8K, offline. Writes "
        "the adapter, metrics.json, rank_history.json and plots to --output-dir.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file setting any of these options (flags win)")
    dataclass_arguments(p, TrainOptions)
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(func=cmd_train)
    return p


# Keys people bring from transformers' TrainingArguments or other tools -> ours.
_KEY_HINTS = {"learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch-size",
              "gradient_accumulation_steps": "grad-accum", "model_name_or_path": "model", "lora_r": "r",
              "rank": "r", "max_seq_length": "max-length", "dataset_name": "dataset", "resume_from_checkpoint": "resume"}


def load_config_file(path: str) -> dict:
    """The options in a YAML or JSON file, keyed by field name, each converted like its flag."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--config {path}: file not found")
    try:
        text = file.read_text()
        if file.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as err:  # yaml/json parse errors
        raise UserError(f"--config {path}: cannot parse it ({str(err).splitlines()[0][:200]})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: must hold a mapping of option: value")
    known = TrainOptions.keys()
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            import difflib

            guess = _KEY_HINTS.get(name) or next(iter(difflib.get_close_matches(name, known, n=1)), None)
            hint = f" (did you mean '{guess.replace('_', '-')}'?)" if guess else ""
            raise UserError(f"--config {path}: unknown key {key!r}{hint}; keys are the train flags without '--', "
                            f"e.g. max-steps, lr, dataset")
        try:
            out[name] = coerce_option(TrainOptions, name, value)
        except argparse.ArgumentTypeError as err:
            raise UserError(f"--config {path}: {key}: {err}") from None
    return out


def cmd_train(args) -> int:
    values = load_config_file(args.config) if args.config else {}
    explicit = set(values)
    for name in TrainOptions.keys():
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
            explicit.add(name)
    opts = TrainOptions(**values)
    # before anything heavy: a missing logger package or an unreadable GGUF model fails now
    report_to_list(opts.report_to)
    if opts.load_in_4bit:
        from ..extras import require

        require(["bitsandbytes"], "quant", "--load-in-4bit")
        show_bnb_kernels_note(True)
    from ..assets import check_model_spec

    check_model_spec(opts.model)
    from .recipe import run_train

    result = run_train(opts, explicit)
    if result["summary"] is None:  # a process other than 0 under torchrun: process 0 prints
        return 0
    from ..run_dir import ADAPTER, METRICS, PLOTS, RANK_HISTORY

    print(f"\n{result['summary']}\noutputs in {opts.output_dir}/ : {ADAPTER}/, {METRICS}, {RANK_HISTORY}, "
          f"{', '.join(PLOTS)}")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    text = write_report(args.run_dir)
    print(text)
    return 0


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report", help="redraw the plots and summary of a finished or interrupted run")
    p.add_argument("run_dir", metavar="DIR", help="an `l1ra train` output directory")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(func=cmd_report)
    return p
