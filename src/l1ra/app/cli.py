"""`l1ra` command line: train, report, merge, generate (and compare, when `l1ra.app.compare` is installed)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
import typing
from pathlib import Path
from typing import Optional, Sequence

from .errors import UserError

EXIT_USER_ERROR = 2


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


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    from .options import TrainOptions

    p = subparsers.add_parser(
        "train", help="fine-tune a model with L1RA (no arguments: SmolLM2-135M-Instruct on GSM8K, offline)",
        description="Fine-tune a model with L1RA. With no arguments: SmolLM2-135M-Instruct on GSM8K, offline (25 min "
        "on 2 shared AVX2 CPU cores in fp32, measured). Writes the adapter, metrics.json, rank_history.json and plots to --output-dir.",
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
    from .options import TrainOptions

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
    from .options import TrainOptions, report_to_list

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
        from .extras import require

        require(["bitsandbytes"], "quant", "--load-in-4bit")
        show_bnb_kernels_note(True)
    from .assets import check_model_spec

    check_model_spec(opts.model)
    from .train import run_train

    result = run_train(opts, explicit)
    if result["summary"] is None:  # a process other than 0 under torchrun: process 0 prints
        return 0
    from .run_dir import ADAPTER, METRICS, PLOTS, RANK_HISTORY

    print(f"\n{result['summary']}\noutputs in {opts.output_dir}/ : {ADAPTER}/, {METRICS}, {RANK_HISTORY}, "
          f"{', '.join(PLOTS)}")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    text = write_report(args.run_dir)
    print(text)
    return 0


def cmd_merge(args) -> int:
    from .serve import merge

    path = merge(args.run_dir, args.out, model=args.model, overwrite=args.overwrite)
    print(f"merged model written to {path}")
    return 0


def cmd_generate(args) -> int:
    from .serve import generate

    text = generate(args.run_dir, args.prompt, model=args.model, max_new_tokens=args.max_new_tokens)
    print(text)
    return 0


# Commands defined in their own modules, added when the module is installed: name -> (module, its line in
# `l1ra --help`). The module is imported only when its command is run (or asked for its --help): its imports
# (torch, for compare) must not slow `l1ra --help` or the other commands' argument errors. The module defines
# `add_parser(subparsers)`; its user-facing errors derive from `l1ra.app.errors.UserError`.
PLUGINS = {
    "compare": ("l1ra.app.compare", "L1RA vs LoRA, AdaLoRA (and DoRA) on a built-in task or your data: same budget, "
                "data, steps, seeds"),
    "export": ("l1ra.app.export_cmd", "write the adapter for another engine (uniform rank, llama.cpp GGUF) or a "
               "smaller budget"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _chosen_command(argv: Sequence[str]) -> Optional[str]:
    # The top-level parser has no option but --help, so the command is the first word that is not an option.
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The `l1ra` parser. Plugin commands are fully defined only when `argv` runs them (see PLUGINS)."""
    parser = argparse.ArgumentParser(prog="l1ra", description="L1RA: LoRA with L1-regularised rank assignment.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_parser(sub)

    p = sub.add_parser("report", help="redraw the plots and summary of a finished or interrupted run")
    p.add_argument("run_dir", metavar="DIR", help="an `l1ra train` output directory")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("merge", help="write the base model with the adapter merged in (a plain transformers model)")
    p.add_argument("run_dir", metavar="DIR", help="an `l1ra train` output directory, a checkpoint or an adapter folder")
    p.add_argument("--out", required=True, metavar="MERGED", help="folder for the merged model")
    p.add_argument("--model", help="base model (default: the one the run trained)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("generate", help="answer a prompt with the tuned model")
    p.add_argument("run_dir", metavar="DIR", help="an `l1ra train` output directory, a checkpoint or an adapter folder")
    p.add_argument("prompt", help="the prompt (the model's chat template is applied when it has one)")
    p.add_argument("--model", help="base model (default: the one the run trained)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="at most this many tokens are generated")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(func=cmd_generate)

    chosen = _chosen_command(list(argv) if argv is not None else sys.argv[1:])
    for name, (module, help_text) in PLUGINS.items():
        if not _installed(module):
            continue
        if name != chosen:
            sub.add_parser(name, help=help_text, add_help=False)  # listed in `l1ra --help`; never parsed
            continue
        try:
            importlib.import_module(module).add_parser(sub)
        except Exception as err:  # a broken optional command must not take the others down
            print(f"l1ra: warning: the {name} command is unavailable ({type(err).__name__}: {err})", file=sys.stderr)
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _is_user_error(err: BaseException) -> bool:
    """A `UserError` (the application's) or one of the library's user-facing errors (caught by type)."""
    if isinstance(err, UserError):
        return True
    if not type(err).__module__.startswith("l1ra."):
        return False
    # raised by the library, so the library (and torch) is loaded: these imports cost nothing here
    from ..checkpoint import CheckpointError
    from ..distributed import DistributedSetupError
    from ..export import ExportError

    return isinstance(err, (CheckpointError, DistributedSetupError, ExportError))


# Third-party warning noise, silenced by category and the module the warning is attributed to. Never a blanket
# filter, never UserWarning: l1ra's own warnings ("l1ra: ...", UserWarning) must reach the user, and one raised
# inside a Trainer callback is attributed to transformers' module.
_THIRD_PARTY = r"(torch|transformers|peft|accelerate|datasets|trl|huggingface_hub|tokenizers|safetensors)(\..*)?$"
_NOISE = (
    # deprecations inside the libraries l1ra calls (e.g. PEFT reading transformers' deprecated
    # `is_gradient_checkpointing` on every PeftModel): nothing a user of `l1ra` can act on
    (FutureWarning, _THIRD_PARTY),
    (DeprecationWarning, _THIRD_PARTY),
)


def quiet_third_party() -> None:
    """Silence the libraries' progress bars, info logs and known warning noise; l1ra's own warnings stay."""
    import warnings

    for category, module in _NOISE:
        warnings.filterwarnings("ignore", category=category, module=module)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass
    if "datasets" in sys.modules or _installed("datasets"):
        try:
            import datasets

            # datasets logs its own ERROR line before raising on a bad file; the CLI's one-line error says it
            datasets.logging.set_verbosity(datasets.logging.CRITICAL)
            datasets.disable_progress_bars()
        except ImportError:
            pass


BNB_KERNELS_NOTE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_the_kernels_note(record) -> bool:
    return not str(record.msg).startswith(BNB_KERNELS_NOTE)


def show_bnb_kernels_note(show: bool) -> None:
    """bitsandbytes (imported by PEFT whenever it is installed) warns on CPUs with AVX-512-BF16 that the optional
    `kernels` package is missing. That kernel would only serve 4-bit inference, so the note is hidden unless the run
    loads a 4-bit base; every other bitsandbytes message still shows."""
    import logging

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    logger.removeFilter(_not_the_kernels_note)
    if not show:
        logger.addFilter(_not_the_kernels_note)


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    debug = getattr(args, "debug", False)
    show_bnb_kernels_note(False)
    try:
        from .extras import require_for_command

        require_for_command(args.command)  # a missing package is named before any work
        if not debug:
            quiet_third_party()
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("l1ra: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        if not _is_user_error(err):
            print(f"l1ra: error: {type(err).__name__}: {err} (run again with --debug for the traceback)",
                  file=sys.stderr)
            return 1
        print(f"l1ra: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
