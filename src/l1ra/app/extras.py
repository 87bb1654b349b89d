"""What each command needs beyond `pip install l1ra`, checked before any work.

`pip install l1ra` installs the library (torch, PEFT, transformers, accelerate, safetensors). The application's
commands need more; each command calls `require(...)` first, so a missing package is named at start-up with the
command that installs it, not after an hour of training. Packages are found with `importlib.util.find_spec`: nothing
is imported here.
"""

from __future__ import annotations

import importlib.util
from typing import Iterable

from .errors import UserError

# extra -> {import name: pip distribution}; must match [project.optional-dependencies] in pyproject.toml
# (tests/app/test_front_door.py checks it).
EXTRAS: dict[str, dict[str, str]] = {
    "train": {"datasets": "datasets", "matplotlib": "matplotlib", "tqdm": "tqdm", "gguf": "gguf", "yaml": "pyyaml",
              "sentencepiece": "sentencepiece", "trl": "trl"},
    "tensorboard": {"tensorboard": "tensorboard"},
    "gguf": {"gguf": "gguf"},
    "quant": {"bitsandbytes": "bitsandbytes"},
}

# command -> (extra, the modules of it the command needs); commands not listed need only the base install.
COMMANDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "train": ("train", tuple(EXTRAS["train"])),
    "compare": ("train", tuple(EXTRAS["train"])),
    "report": ("train", ("matplotlib",)),
}


class MissingExtraError(UserError, RuntimeError):
    """A package the command needs is not installed; the message names it and the pip command."""


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None in sys.modules
        return False


def missing(modules: Iterable[str]) -> list[str]:
    return [m for m in modules if not installed(m)]


def require(modules: Iterable[str], extra: str, what: str) -> None:
    """Raise `MissingExtraError` naming every module of `modules` that is not installed and `pip install 'l1ra[extra]'`.

    `what` says who needs them, e.g. "`l1ra train`" or "--report-to tensorboard".
    """
    absent = missing(modules)
    if absent:
        dists = [EXTRAS.get(extra, {}).get(m, m) for m in absent]
        raise MissingExtraError(
            f"{what} needs {', '.join(dists)}, not installed; install with: pip install 'l1ra[{extra}]'"
        )


def require_for_command(command: str) -> None:
    """The start-up check of `l1ra <command>` (no-op for commands that need only the base install)."""
    if command in COMMANDS:
        extra, modules = COMMANDS[command]
        require(modules, extra, f"`l1ra {command}`")
