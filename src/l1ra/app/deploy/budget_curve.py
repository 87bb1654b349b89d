"""Held-out loss against budget for an `l1ra train` run: how small the adapter can get before deploying.

For each budget the run's adapter is truncated with `l1ra.export.export_adapter` (the best adapter of that total
rank), loaded into the base model with plain PEFT next to the untruncated adapter, and scored on the run's own
held-out set by the run's own Trainer evaluation (`build_trainer` -> `LMTrainer` / `ClassifierTrainer`,
`heldout_metrics`): the same rows, the same loss, the same precision where the device is the same.
Writes `<run>/budget_curve.json` and `<run>/budget_curve.png`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from ...atomic import atomic_write_json
from ...export import ExportError, budget_curve, budget_from_fraction, export_adapter, read_adapter
from ..run_dir import ADAPTER, CURVE_JSON, CURVE_PNG, METRICS, RUN_CONFIG, RunDirError, find_adapter, read_config, \
    read_json
DEFAULT_FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.1)


def run_folder(src) -> Optional[Path]:
    """The `l1ra train` folder `src` belongs to (the run folder itself or its `adapter/`), else None."""
    try:
        located = find_adapter(src)
    except RunDirError:
        return None
    return located.run if located.is_trained_run() else None


def _plan(config: dict):
    """The run's device plan: its recorded precision where this machine has the same device, else what `l1ra train`
    would choose here for these options."""
    from ..devices import DevicePlan, current_plan

    here = current_plan()
    recorded = str((config.get("data") or {}).get("device", ""))
    device, _, precision = recorded.partition(", ")
    if device == here.device and precision in ("fp32", "bf16", "fp16"):
        return DevicePlan(device, bf16=precision == "bf16", fp16=precision == "fp16")
    return here


def _adapter_parameters(path: Path) -> int:
    return sum(m.a.numel() + m.b.numel() for m in read_adapter(path).modules.values())


def _trained_run(run_dir) -> tuple[Path, dict]:
    """`(run folder, its train_config.json)`; `ExportError` for anything but an `l1ra train` output folder."""
    run = run_folder(run_dir)
    if run is None:
        raise ExportError(f"{run_dir}: not an `l1ra train` output folder ({RUN_CONFIG} and {ADAPTER}/); the "
                          "held-out curve needs the run's data and model (for a bare adapter, --curve shows the "
                          "update's energy only)")
    return run, read_config(run)


def _budgets(adapter, fractions: Optional[Sequence[float]], budgets: Optional[Sequence[int]]) -> list[int]:
    """The total ranks to score, largest first, each checked against the adapter."""
    if fractions is not None and budgets is not None:
        raise ExportError("fractions and budgets both given: pass one of them")
    n_modules, total = len(adapter.modules), sum(adapter.ranks.values())
    if budgets is None:
        budgets = [budget_from_fraction(adapter, float(f)) for f in (fractions or DEFAULT_FRACTIONS)]
    budgets = sorted({int(b) for b in budgets}, reverse=True)
    bad = [b for b in budgets if not n_modules <= b <= total]
    if bad:
        raise ExportError(f"budget {bad[0]}: must be between the number of adapted modules ({n_modules}) and the "
                          f"adapter's total rank ({total})")
    return budgets


def _evaluator(config: dict, adapter_dir: Path, adapters: dict, plan, max_eval: Optional[int], tmp: Path):
    """`(trainer, model)`: the base model with the saved adapter ("full") and each of `adapters` ({name: folder})
    loaded by plain PEFT, and the run's own Trainer evaluation on the run's held-out rows (first `max_eval`)."""
    from peft import PeftModel

    from ..train.examples import DataChoice, llm_examples, sentiment_examples
    from ..train.models import load_model, load_tokenizer
    from ..train.trainers import build_trainer

    options, task, model_path = config.get("options") or {}, config.get("task", "causal-lm"), config["model_path"]
    tokenizer = load_tokenizer(model_path)
    choice = DataChoice.from_options(options)  # the run's recorded data options: the same held-out rows
    if task == "classification":
        _, held, _ = sentiment_examples(tokenizer, choice.max_length, choice.max_eval)
    else:
        _, held, _ = llm_examples(tokenizer, choice, log=lambda msg: None)  # the run already reported skipped rows
    held = held[:max_eval] if max_eval is not None else held
    model = PeftModel.from_pretrained(load_model(model_path, task), str(adapter_dir), adapter_name="full")
    for name, path in adapters.items():
        model.load_adapter(str(path), adapter_name=name)
    model.eval()
    data = config.get("data") or {}
    args_kwargs = dict(
        output_dir=str(tmp / "trainer"), seed=choice.seed, data_seed=choice.seed, report_to="none", disable_tqdm=True,
        per_device_eval_batch_size=max(options.get("batch_size", 8), 16) if task == "causal-lm" else 128,
        remove_unused_columns=False, dataloader_num_workers=0, **plan.training_arguments(),
    )
    trainer = build_trainer(task, model, tokenizer, held[:1], held, args_kwargs, None, [], choice.max_length,
                            padding_free=data.get("padding_free"), sparse_head=data.get("sparse_lm_head"))
    return trainer, model


def budget_curve_run(run_dir, fractions: Optional[Sequence[float]] = None, budgets: Optional[Sequence[int]] = None,
                     max_eval: Optional[int] = None, out=None, log=None) -> dict:
    """Score the run's adapter truncated to each budget on the run's held-out set; returns the curve (also written to
    `<out>/budget_curve.json` and `<out>/budget_curve.png`, `out` defaulting to the run folder).

    fractions: of the adapter's total rank (default 1.0, 0.75, 0.5, 0.25, 0.1); budgets: total ranks (instead).
    max_eval: score only the first N held-out examples (faster; the base and full-adapter lines use the same N).
    """
    from ..train.trainers import from_trainer_metrics

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    run, config = _trained_run(run_dir)
    if max_eval is not None and max_eval < 1:
        raise ExportError(f"max_eval={max_eval}: must be >= 1")
    if not config.get("model_path"):
        raise ExportError(f"{run / RUN_CONFIG}: names no model_path; is it an `l1ra train` output folder?")
    adapter_dir = run / ADAPTER
    adapter = read_adapter(adapter_dir)
    n_modules, total = len(adapter.modules), sum(adapter.ranks.values())
    budgets = _budgets(adapter, fractions, budgets)
    energy = {row["budget"]: row for row in budget_curve(adapter, budgets)}
    plan = _plan(config)
    points = []
    with tempfile.TemporaryDirectory(prefix="l1ra-curve-") as tmp:
        tmp = Path(tmp)
        folders = {b: export_adapter(adapter_dir, tmp / f"budget-{b}", format="peft", budget=b) for b in budgets}
        # the untruncated adapter as saved, loaded by plain PEFT; at full budget the export is the same function (an
        # SVD re-factoring), so it is scored only when the full budget is not among the points
        trainer, model = _evaluator(config, adapter_dir, {f"budget_{b}": f for b, f in folders.items()}, plan,
                                    max_eval, tmp)
        n_eval = len(trainer.eval_dataset)
        log(f"l1ra: scoring {len(budgets)} budgets of {run} on {n_eval} held-out examples ({plan.describe()}) ...")

        def score(name: Optional[str]) -> dict:
            if name is None:
                with model.disable_adapter():
                    return from_trainer_metrics(trainer.evaluate())
            model.set_adapter(name)
            return from_trainer_metrics(trainer.evaluate())

        t0 = time.perf_counter()
        base = score(None)
        log(f"l1ra: base model: held-out loss {base['loss']:.4f} ({time.perf_counter() - t0:.0f} s)")
        full = None if total in budgets else score("full")
        for budget in budgets:
            result = score(f"budget_{budget}")
            full = result if budget == total else full
            points.append({"budget": budget, "fraction": budget / total,
                           "parameters": _adapter_parameters(folders[budget]), "heldout_loss": result["loss"],
                           **{k: v for k, v in result.items() if k != "loss"},
                           "energy_kept": energy[budget]["kept"], "max_rank": energy[budget]["max_rank"]})
            log(f"l1ra: budget {budget}: held-out loss {result['loss']:.4f} ({time.perf_counter() - t0:.0f} s so far)")
    curve = {
        "run": str(run), "model_path": config["model_path"], "task": config.get("task", "causal-lm"),
        "device": plan.describe(), "eval_examples": n_eval, "max_eval": max_eval, "modules": n_modules,
        "total_rank": total, "base": base,
        "full": {**full, "budget": total, "parameters": _adapter_parameters(adapter_dir),
                 "scored": "fraction-1 export" if total in budgets else "the saved adapter"},
        "run_tuned_loss": (read_json(run / METRICS).get("tuned") or {}).get("loss"),
        "run_eval_examples": (config.get("data") or {}).get("eval_examples"),
        "points": points,
    }
    out = Path(out) if out is not None else run
    atomic_write_json(out / CURVE_JSON, curve)
    plot_curve(curve, out / CURVE_PNG)
    return curve


def plot_curve(curve: dict, path: Path) -> None:
    from ..train.report import MaxNLocator, _plt, _save

    plt = _plt()
    pts = sorted(curve["points"], key=lambda p: p["budget"])
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    ax.plot([p["budget"] for p in pts], [p["heldout_loss"] for p in pts], "o-", color="tab:orange", linewidth=2,
            markersize=6, label="truncated adapter")
    for p in pts:
        ax.annotate(f"{100 * p['fraction']:.0f}%", (p["budget"], p["heldout_loss"]), textcoords="offset points",
                    xytext=(0, 7), ha="center", fontsize=8)
    base, full = curve["base"]["loss"], curve["full"]["loss"]
    ax.axhline(base, color="gray", linestyle="--", linewidth=1, label=f"base model ({base:.3f})")
    ax.axhline(full, color="tab:blue", linestyle=":", linewidth=1.5,
               label=f"full adapter, rank {curve['total_rank']} ({full:.3f})")
    ax.set_xlabel("total rank kept (over all adapted modules)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("held-out loss" + (" (mean per target token)" if curve.get("task") != "classification" else ""))
    ax.set_title(f"held-out loss against adapter budget ({curve['eval_examples']} held-out examples)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def format_table(curve: dict) -> str:
    rows = [f"{'budget':>6}  {'fraction':>8}  {'parameters':>10}  {'held-out loss':>13}  {'energy kept':>11}"]
    for p in curve["points"]:
        rows.append(f"{p['budget']:>6}  {100 * p['fraction']:>7.1f}%  {p['parameters']:>10,}  "
                    f"{p['heldout_loss']:>13.4f}  {100 * p['energy_kept']:>10.2f}%")
    rows.append(f"base model: {curve['base']['loss']:.4f}; full adapter (total rank {curve['total_rank']}): "
                f"{curve['full']['loss']:.4f}")
    if curve.get("run_tuned_loss") is not None:
        rows.append(f"the run's own tuned loss (metrics.json, {curve.get('run_eval_examples')} held-out examples): "
                    f"{curve['run_tuned_loss']:.4f}")
    return "\n".join(rows)


__all__ = ["CURVE_JSON", "CURVE_PNG", "DEFAULT_FRACTIONS", "budget_curve_run", "format_table", "plot_curve",
           "run_folder"]
