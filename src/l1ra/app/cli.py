"""`l1ra` command line: one lazy table of commands (train, report, merge, generate, export, compare), one rule for
user errors, and the start-up that keeps third-party noise off the screen."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

from .console import quiet_third_party, show_bnb_kernels_note
from .errors import UserError

EXIT_USER_ERROR = 2


# The commands: name -> (module, the function that adds its parser, its line in `l1ra --help`). A command's module
# is imported only when that command is run (or asked for its --help), so that `l1ra --help` and every argument
# error stay fast; the modules are light themselves (torch and transformers load when the command runs).
COMMANDS = {
    "train": ("l1ra.app.train.command", "add_parser",
              "fine-tune a model with L1RA (no arguments: SmolLM2-135M-Instruct on GSM8K, offline)"),
    "report": ("l1ra.app.train.command", "add_report_parser",
               "redraw the plots and summary of a finished or interrupted run"),
    "merge": ("l1ra.app.deploy.command", "add_merge_parser",
              "write the base model with the adapter merged in (a plain transformers model)"),
    "generate": ("l1ra.app.deploy.command", "add_generate_parser", "answer a prompt with the tuned model"),
    "export": ("l1ra.app.deploy.command", "add_export_parser",
               "write the adapter for another engine (uniform rank, llama.cpp GGUF) or a smaller budget"),
    "compare": ("l1ra.app.compare.cli", "add_parser",
                "L1RA vs LoRA, AdaLoRA (and DoRA) on a built-in task or your data: same budget, data, steps, seeds"),
}


def _chosen_command(argv: Sequence[str]) -> Optional[str]:
    # The top-level parser has no option but --help, so the command is the first word that is not an option.
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The `l1ra` parser: every command listed, only the one `argv` runs fully defined (see COMMANDS)."""
    parser = argparse.ArgumentParser(prog="l1ra", description="L1RA: LoRA with L1-regularised rank assignment.",
                                     epilog="`l1ra COMMAND --help` shows a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen_command(list(argv) if argv is not None else sys.argv[1:])
    for name, (module, function, help_text) in COMMANDS.items():
        if name == chosen:
            getattr(importlib.import_module(module), function)(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)  # listed in `l1ra --help`; never parsed
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
