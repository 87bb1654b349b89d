"""`l1ra` command line: train, report, merge, generate (and compare, when `l1ra.app.compare` is installed)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

EXIT_USER_ERROR = 2


def _bool(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None


# flag -> (type, metavar); help texts come from TrainOptions' field metadata
_TRAIN_TYPES = {
    "max_steps": int, "epochs": _number, "lr": _number, "batch_size": int, "grad_accum": int, "max_length": int,
    "r": int, "lora_alpha": _number, "l1ra_lambda": _number, "eta_c": _number, "update_every": _number,
    "l1_start": _number, "seed": int,
    "eval_steps": int, "save_steps": int, "eval_fraction": _number, "max_eval": int,
}


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    from .options import DEFAULT_OUTPUT_DIR, TrainOptions

    p = subparsers.add_parser(
        "train", help="fine-tune a model with L1RA (no arguments: SmolLM2-135M-Instruct on GSM8K, offline)",
        description="Fine-tune a model with L1RA. With no arguments: SmolLM2-135M-Instruct on GSM8K, offline, about "
        "10 minutes on 2 CPU cores. Writes the adapter, metrics.json, rank_history.json and plots to --output-dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter if False else argparse.HelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file setting any of these options (flags win)")
    for f in dataclasses.fields(TrainOptions):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.name == "output_dir":
            help_text += f" (default: {DEFAULT_OUTPUT_DIR})"
        if f.name in ("overwrite",):
            p.add_argument(flag, action="store_true", default=None, help=help_text)
        elif f.name == "bf16":
            p.add_argument(flag, nargs="?", const=True, type=_bool, default=None, metavar="BOOL", help=help_text)
        elif f.name == "resume":
            p.add_argument(flag, nargs="?", const="auto", default=None, metavar="CHECKPOINT", help=help_text)
        elif f.name == "preset":
            p.add_argument(flag, choices=["gsm8k", "sentiment"], default=None, help=help_text)
        else:
            p.add_argument(flag, type=_TRAIN_TYPES.get(f.name, str), default=None,
                           metavar=f.name.upper(), help=help_text)
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(func=cmd_train)
    return p


def load_config_file(path: str) -> dict:
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
    known = set(TrainOptions.keys())
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise UserError(f"--config {path}: unknown key {key!r}; keys are the train flags without '--', "
                            f"e.g. max-steps, lr, dataset")
        out[name] = value
    return out


def cmd_train(args) -> int:
    from .options import TrainOptions
    from .train import run_train

    values = load_config_file(args.config) if args.config else {}
    if values.get("target_modules") is not None and isinstance(values["target_modules"], list):
        values["target_modules"] = ",".join(values["target_modules"])
    explicit = set(values)
    for name in TrainOptions.keys():
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
            explicit.add(name)
    try:
        opts = TrainOptions(**values)
    except TypeError as err:
        raise UserError(f"bad option: {err}") from None
    result = run_train(opts, explicit)
    print(f"\n{result['summary']}\noutputs in {opts.output_dir}/ : adapter/, metrics.json, rank_history.json, "
          "rank_heatmap.png, rank_by_module_type.png, loss_curves.png")
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


class UserError(Exception):
    """A CLI-level user error (bad flag value or config file)."""


def build_parser() -> argparse.ArgumentParser:
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

    # `l1ra compare` lives in its own module; add it when it is there.
    if importlib.util.find_spec("l1ra.app.compare") is not None:
        try:
            importlib.import_module("l1ra.app.compare").add_parser(sub)
        except Exception as err:  # a broken optional command must not take the others down
            print(f"l1ra: warning: the compare command is unavailable ({err})", file=sys.stderr)
    return parser


def _known_errors() -> tuple[type, ...]:
    from .assets import AssetError
    from .data import DataError
    from ..checkpoint import CheckpointError
    from .report import ReportError

    errors = [UserError, AssetError, DataError, CheckpointError, ReportError]
    try:
        from .options import RunError

        errors.append(RunError)
    except ImportError:
        pass
    try:
        from .serve import ServeError

        errors.append(ServeError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    debug = getattr(args, "debug", False)
    if not debug:
        import warnings

        warnings.filterwarnings("ignore")
        try:
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
            import datasets

            # datasets logs its own ERROR line before raising on a bad file; the CLI's one-line error says it
            datasets.logging.set_verbosity(datasets.logging.CRITICAL)
            datasets.disable_progress_bars()
        except ImportError:
            pass
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("l1ra: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug or not isinstance(err, _known_errors()):
            if not debug:
                print(f"l1ra: error: {type(err).__name__}: {err} (run again with --debug for the traceback)",
                      file=sys.stderr)
                return 1
            raise
        print(f"l1ra: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
