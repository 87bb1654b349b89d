"""What a running `l1ra train` writes as it goes: curves and metrics (`Recorder`), and the Trainer callback that feeds
them (progress, held-out evaluations, non-finite guard, live rank history)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainerCallback

from ...atomic import atomic_write_json
from ..run_dir import METRICS, RANK_HISTORY
from .trainers import from_trainer_metrics, ppl


class Recorder:
    """Keeps curves and metrics and rewrites `metrics.json` / `rank_history.json` atomically as the run goes."""

    def __init__(self, out: Path, task: str, previous: dict, run_config: dict, budget: int, trainable: int):
        self.out = out
        self.task = task
        curves = previous.get("curves", {})
        self.train_curve: list = curves.get("train", [])
        self.eval_curve: list = curves.get("eval", [])
        self.lr_curve: list = curves.get("lr", [])
        self.metrics: dict = {
            "task": task, "model": run_config["model_path"], "dataset": run_config["data"]["dataset"],
            "budget": budget, "trainable_parameters": trainable, "max_steps": run_config["max_steps"],
            "options": run_config["options"], "l1ra_config": run_config["l1ra_config"],
        }
        if previous.get("base"):
            self.metrics["base"] = previous["base"]

    def truncate(self, step: int) -> None:
        self.train_curve = [p for p in self.train_curve if p[0] <= step]
        self.lr_curve = [p for p in self.lr_curve if p[0] <= step]
        self.eval_curve = [p for p in self.eval_curve if p[0] <= step]

    def flush(self, model=None) -> None:
        self.metrics["curves"] = {"train": self.train_curve, "eval": self.eval_curve, "lr": self.lr_curve}
        if self.train_curve:
            # The adapters start as an exact no-op (B = 0), so the first step's loss is the base model's on that batch.
            tail = [v for _, v in self.train_curve[-10:]]
            first, last = self.train_curve[0][1], sum(tail) / len(tail)
            self.metrics["train_loss"] = {"base_first_batch": first, "base_first_batch_perplexity": ppl(first),
                                          "tuned_last10_mean": last, "tuned_last10_mean_perplexity": ppl(last)}
        atomic_write_json(self.out / METRICS, self.metrics)
        if model is not None:
            write_rank_history(model, self.out / RANK_HISTORY)


def write_rank_history(model, path: Path) -> None:
    import l1ra

    st = l1ra.find_l1ra_model(model).l1ra_state
    atomic_write_json(path, {"budget": st.budget, "total_steps": st.total_steps,
                             "moved": st.history.total_moved, "events": st.history.to_json()})


def nonfinite_flag(params) -> Optional[torch.Tensor]:
    """A 0-dim bool tensor, True when some tensor holds a NaN or an inf, computed on the device without a host sync:
    the inf-norm of each tensor (NaN and inf propagate, and a max cannot overflow) in one fused `_foreach_norm` per
    device. None for no tensors."""
    by_device: dict = {}
    for p in params:
        by_device.setdefault(p.device, []).append(p.detach())
    flags = [(~torch.isfinite(torch.stack(torch._foreach_norm(ts, float("inf"))))).any() for ts in by_device.values()]
    if not flags:
        return None
    first = flags[0].device
    return flags[0] if len(flags) == 1 else torch.stack([f.to(first, non_blocking=True) for f in flags]).any()


def trainable(model) -> list:
    """The model's trainable parameters now (a reallocation replaces some, so never keep this list)."""
    return [p for p in model.parameters() if p.requires_grad]


class RunCallback(TrainerCallback):
    """Progress bar, loss/lr curves, held-out evaluations (run by the Trainer), non-finite guard, live rank history."""

    def __init__(self, recorder: Optional[Recorder], max_steps: int, start: int = 0):
        self.recorder = recorder
        self.max_steps, self.start = max_steps, start
        self.progress = None
        self.active = False  # evaluations outside training (the base model's, a final one) are recorded by the caller
        self.nonfinite: Optional[int] = None
        self.last_eval = None
        self.last_eval_step = None
        self.n_events = 0
        self.pending = None  # device flag: a trainable parameter went non-finite since the last read
        if recorder is not None:
            recorder.truncate(start)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from .progress import Progress

        self.active = True
        self.model = model
        self.pending = None
        self.progress = Progress(self.max_steps, start=state.global_step)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        logs = logs or {}
        # The Trainer has just read its loss (a host sync), so reading the parameters' flag now costs no extra wait.
        if self._read_flag(state.global_step, control) or "loss" not in logs:
            return
        loss = float(logs["loss"])
        step = state.global_step
        if not math.isfinite(loss):
            self._stop(step, control)
            return
        self.recorder.train_curve.append([step, loss])
        if "learning_rate" in logs:
            self.recorder.lr_curve.append([step, float(logs["learning_rate"])])
        import l1ra

        moved = l1ra.rank_history(model or self.model).total_moved
        if self.progress:
            self.progress.update(step, loss=loss, lr=logs.get("learning_rate"), moved=moved)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.nonfinite is not None:
            return
        # Checked on the device every step (the parameters looked up now: a reallocation replaces some); read on the
        # host only where the Trainer syncs anyway: when it logs (on_log), evaluates, saves or stops.
        flag = nonfinite_flag(trainable(model or self.model))
        if flag is not None:
            self.pending = flag if self.pending is None else self.pending | flag
        last = state.global_step >= self.max_steps or control.should_training_stop
        if (control.should_save or control.should_evaluate or last) and self._read_flag(state.global_step, control):
            return
        import l1ra

        events = l1ra.rank_history(model).events
        if len(events) != self.n_events:
            self.n_events = len(events)
            write_rank_history(model, self.recorder.out / RANK_HISTORY)
        if state.global_step == self.max_steps:
            control.should_evaluate = True  # the Trainer's schedule covers multiples of eval_steps; add the end

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if not self.active or not metrics:
            return
        result = from_trainer_metrics(metrics)
        step = state.global_step
        self.last_eval, self.last_eval_step = result, step
        self.recorder.eval_curve.append([step, result["loss"]])
        extra = f", accuracy {result['accuracy']:.3f}" if "accuracy" in result else ""
        if self.progress:
            self.progress.write(f"step {step}: held-out loss {result['loss']:.4f}{extra}")
        self.recorder.flush(model)

    def on_save(self, args, state, control, model=None, **kwargs):
        self.recorder.flush(model)

    def _read_flag(self, step: int, control) -> bool:
        """Read the pending device flag (one host sync); stop the run if a parameter went non-finite."""
        if self.nonfinite is not None:
            return True
        pending, self.pending = self.pending, None
        if pending is not None and bool(pending):
            self._stop(step, control)
            return True
        return False

    def _stop(self, step: int, control) -> None:
        self.nonfinite = step
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False

    def close(self):
        if self.progress:
            self.progress.close()
            self.progress = None

    def on_train_end(self, args, state, control, **kwargs):
        self.active = False
        self.close()
