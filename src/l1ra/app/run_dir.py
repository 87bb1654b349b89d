"""The `l1ra train` output folder: the one place that knows its file names and finds its adapter and checkpoints.

    <run>/
      adapter/                  the trained adapter (a plain PEFT LoRA folder) and the tokenizer
      checkpoint-N/             the latest resumable Trainer checkpoint (an adapter folder too)
      train_config.json         the options, base model path, data and L1RA config of the run
      metrics.json              losses, curves and timings (rewritten as the run goes)
      rank_history.json         every reallocation's ranks
      summary.txt, rank_heatmap.png, rank_by_module_type.png, loss_curves.png     `l1ra report`
      budget_curve.json, budget_curve.png                                          `l1ra export --curve`

Every command that takes an adapter (`merge`, `generate`, `export`) finds it with `find_adapter`, so they accept the
same things: a run folder, one of its checkpoints or its adapter/, or any PEFT adapter folder.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import UserError

ADAPTER = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "train_config.json"
METRICS = "metrics.json"
RANK_HISTORY = "rank_history.json"
SUMMARY = "summary.txt"
HEATMAP, RANK_BY_TYPE, LOSS_CURVES = "rank_heatmap.png", "rank_by_module_type.png", "loss_curves.png"
PLOTS = (HEATMAP, RANK_BY_TYPE, LOSS_CURVES)
CURVE_JSON, CURVE_PNG = "budget_curve.json", "budget_curve.png"
# what `l1ra train --overwrite` removes (with the checkpoints)
OUTPUT_FILES = (ADAPTER, METRICS, RANK_HISTORY, RUN_CONFIG, SUMMARY, *PLOTS)
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


class RunDirError(UserError, ValueError):
    """A folder that cannot be used as asked (it holds no adapter, or another run); the message says what to pass."""


@dataclass(frozen=True)
class Located:
    """Where a command's adapter is: the adapter folder, and the run folder it belongs to (None for a bare one)."""

    adapter: Path
    run: Optional[Path]

    def config(self) -> dict:
        """The run's train_config.json ({} for a bare adapter or an unreadable file)."""
        return read_config(self.run) if self.run is not None else {}

    def base_model(self) -> Optional[str]:
        """The base model: the one the run trained, else the adapter's `base_model_name_or_path`."""
        own = read_json(self.adapter / ADAPTER_CONFIG).get("base_model_name_or_path")
        return self.config().get("model_path") or own

    def is_trained_run(self) -> bool:
        """True when this is a run's final adapter and the run recorded its options and model (what `--curve`,
        which re-reads the run's held-out data, needs)."""
        config = self.config()
        return self.run is not None and self.adapter == self.run / ADAPTER and "options" in config \
            and bool(config.get("model_path"))


def read_json(path) -> dict:
    """The JSON object in `path`; {} when it is missing, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def read_config(run) -> dict:
    return read_json(Path(run) / RUN_CONFIG)


def is_run(path) -> bool:
    return (Path(path) / RUN_CONFIG).is_file()


def is_adapter(path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def checkpoint_step(path) -> int:
    """N of a `checkpoint-N` folder (0 for None or another name)."""
    m = _CHECKPOINT.fullmatch(Path(path).name) if path is not None else None
    return int(m.group(1)) if m else 0


def latest_checkpoint(run) -> Optional[Path]:
    """The `checkpoint-N` folder of `run` with the largest N that holds an adapter, else None."""
    found = [(checkpoint_step(p), p) for p in Path(run).glob("checkpoint-*")
             if _CHECKPOINT.fullmatch(p.name) and p.is_dir() and is_adapter(p)]
    return max(found)[1] if found else None


def find_adapter(src) -> Located:
    """The adapter of `src`: an `l1ra train` output folder (its adapter/, else its latest checkpoint), one of its
    checkpoints or adapter/ folder, or any PEFT adapter folder. Raises `RunDirError` naming what to pass."""
    src = Path(src)
    if not src.is_dir():
        raise RunDirError(f"{src}: no such folder; pass an `l1ra train` output folder or a PEFT adapter folder")
    if is_adapter(src):
        run = next((r for r in (src.parent, src) if is_run(r)), None)
        return Located(src, run)
    if is_adapter(src / ADAPTER):
        return Located(src / ADAPTER, src)
    ckpt = latest_checkpoint(src)
    if ckpt is not None:
        return Located(ckpt, src if is_run(src) else None)
    raise RunDirError(f"{src}: holds no adapter ({ADAPTER}/, checkpoint-N/ or {ADAPTER_CONFIG}); pass an `l1ra train` "
                      "output folder or a PEFT adapter folder")


def claim_output_dir(out, resume: Optional[str], overwrite: bool, clear: bool = True) -> Optional[Path]:
    """Make `out` ready for `l1ra train`, refusing to mix two runs in one folder; returns the checkpoint to resume
    from (`resume`: "auto" for the latest, or a checkpoint's path), if any. With `overwrite` the previous run's outputs
    are removed, unless `clear` is False (under torchrun, processes other than 0 only check)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--output-dir {out}: exists and is not a directory")
    if resume:
        if overwrite:
            raise RunDirError("--resume and --overwrite contradict each other; drop one")
        ckpt = latest_checkpoint(out) if resume == "auto" else Path(resume)
        if ckpt is None:
            raise RunDirError(f"--resume: no checkpoint-N folder in {out} to resume from; start a new run without "
                              "--resume")
        if not is_adapter(ckpt) or not (ckpt / "trainer_state.json").exists():
            raise RunDirError(f"--resume {ckpt}: not a checkpoint folder (no {ADAPTER_CONFIG} / trainer_state.json)")
        return ckpt
    previous = out.is_dir() and (any((out / n).exists() for n in OUTPUT_FILES) or latest_checkpoint(out) is not None)
    if previous and not overwrite:
        raise RunDirError(f"--output-dir {out} holds another run; pass --overwrite to replace it, --resume to continue "
                          "it, or choose another --output-dir")
    if previous and clear:
        for name in OUTPUT_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        for path in out.glob("checkpoint-*"):
            shutil.rmtree(path, ignore_errors=True)
    return None
