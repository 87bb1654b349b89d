"""The statistics of `l1ra compare`: per-seed differences against LoRA (same seed: same data order and
initialisation) with 95% Student-t intervals, the per-row summary of a task, and the targets as measured."""

from __future__ import annotations

import math
import statistics
from typing import Optional

from .methods import L1RA_METHODS, LABELS, METHODS

TARGETS = {"step_ratio": 1.03, "accuracy_points": -0.5, "loss": -0.01}
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_interval(values: list) -> tuple[float, float, float]:
    """(mean, low, high): the 95% Student-t interval of the mean; (mean, nan, nan) with fewer than 2 values."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = statistics.fmean(values)
    if n < 2:
        return mean, float("nan"), float("nan")
    t = T975[n - 2] if n - 2 < len(T975) else 1.96
    half = t * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_vs_lora(runs: list[dict], lora: dict) -> Optional[dict]:
    """Per-seed improvement over LoRA (same seed: same data order and initialisation), in the score's reporting unit
    (accuracy in points; loss as is, positive = lower loss), with its 95% t-interval."""
    pairs = [(r, lora[r["seed"]]) for r in runs if r["seed"] in lora]
    if not pairs:
        return None
    higher = runs[0]["higher_is_better"]
    scale = 100.0 if runs[0]["score_name"] == "accuracy" else 1.0
    diffs = [(1 if higher else -1) * (r["score"] - l["score"]) * scale for r, l in pairs]
    mean, low, high = t_interval(diffs)
    return {"seeds": [r["seed"] for r, _ in pairs], "differences": diffs, "mean": mean, "ci95": [low, high],
            "unit": "accuracy points" if scale == 100.0 else f"{runs[0]['score_name']} (positive: lower than LoRA)"}


def _mean_std(values: list) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict], step_timing: Optional[dict] = None) -> dict:
    """{task: {"methods": {method: figures}, "targets": {...}}}; ratios and differences to LoRA are paired by seed.
    With `step_timing` (the interleaved measurement), its per-step ratios are the step-time ratio."""
    out = {}
    step_timing = step_timing or {}
    for task in dict.fromkeys(r["task"] for r in runs):
        task_runs = [r for r in runs if r["task"] == task]
        lora = {r["seed"]: r for r in task_runs if r["method"] == "lora"}
        methods = {}
        for method in [m for m in METHODS if any(r["method"] == m for r in task_runs)]:
            mr = [r for r in task_runs if r["method"] == method]
            paired = [(r, lora[r["seed"]]) for r in mr if r["seed"] in lora]
            timed = [(r, l) for r, l in paired if r["step_time_median_s"] and l["step_time_median_s"]]
            step_ratio = [r["step_time_median_s"] / l["step_time_median_s"] for r, l in timed]
            mem_ratio = [r["peak_rss_mb"] / l["peak_rss_mb"] for r, l in paired if r["step_times_s"]]
            types = list(dict.fromkeys(t for r in mr for t in r["rank_by_type"]))
            s = {
                "label": LABELS.get(method, method),
                "description": METHODS.get(method, ""),
                "n_seeds": len(mr),
                "seeds": [r["seed"] for r in mr],
                "lr": sorted({r["spec"]["lr"] for r in mr}),
                "score_name": mr[0]["score_name"],
                "higher_is_better": mr[0]["higher_is_better"],
                "score": _mean_std([r["score"] for r in mr]),
                "vs_lora": paired_vs_lora(mr, lora) if method != "lora" else None,
                "step_time_median_s": _mean_std([r["step_time_median_s"] for r in mr]),
                "step_ratio": _mean_std(step_ratio),
                "peak_rss_mb": _mean_std([r["peak_rss_mb"] for r in mr]),
                "mem_ratio": _mean_std(mem_ratio),
                "training_state_mb": _mean_std([r.get("training_state_mb") for r in mr]),
                "train_wall_s": _mean_std([r["train_wall_s"] for r in mr]),
                "trainable_params_end": _mean_std([r["trainable_params_end"] for r in mr]),
                "effective_params_end": _mean_std([r["effective_params_end"] for r in mr]),
                "lora_params_end": _mean_std([r.get("lora_params_end") for r in mr]),
                "total_rank_effective": _mean_std([r["total_rank_effective"] for r in mr]),
                "rank_by_type": {
                    t: statistics.fmean([r["rank_by_type"].get(t, 0.0) for r in mr]) for t in types
                },
                "device": mr[0].get("device"),
            }
            timing = step_timing.get(task, {}).get("methods", {}).get(method)
            if timing:
                s["step_ratio_separate_runs"] = s["step_ratio"]
                s["step_ratio"] = (timing["ratio_median"], _iqr_half(timing["ratios"]))
                s["step_ratio_source"] = "interleaved"
            else:
                s["step_ratio_source"] = "separate runs"
            if "perplexity" in mr[0]["metrics"]:
                s["perplexity"] = _mean_std([r["metrics"]["perplexity"] for r in mr])
            if method in L1RA_METHODS:
                s["ranks_moved"] = _mean_std([r["l1ra"]["ranks_added"] for r in mr])
                s["ranks_pruned"] = _mean_std([r["l1ra"]["ranks_pruned"] for r in mr])
            methods[method] = s
        # the targets are the project's, set for its built-in tasks; a user's data has none
        out[task] = {"methods": methods, "targets": check_targets(methods) if task != "dataset" else {},
                     "splits": task_runs[0].get("splits", {})}
    return out


def _iqr_half(values: list) -> float:
    """Half the interquartile range: the spread shown next to a median."""
    if len(values) < 4:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / 2


def check_targets(methods: dict) -> dict:
    """The issue's targets, as measured: True (met), False (missed), None (not measurable: a row or seeds missing)."""
    if "lora" not in methods:
        return {}
    out = {}
    tuned = methods.get("l1ra_tuned")
    if tuned is not None:
        vs = tuned["vs_lora"]
        accuracy = tuned["score_name"] == "accuracy"
        floor = TARGETS["accuracy_points"] if accuracy else TARGETS["loss"]
        low = vs["ci95"][0] if vs else float("nan")
        out["l1ra_tuned_ci_low_above_floor"] = None if math.isnan(low) else low > floor
        out["l1ra_tuned_ci_low_above_0"] = None if math.isnan(low) else low > 0
        out["l1ra_tuned_step_ratio_le_1.03"] = tuned["step_ratio"][0] <= TARGETS["step_ratio"]
    params = methods.get("l1ra_params")
    if params is not None:
        out["l1ra_params_params_le_lora"] = params["lora_params_end"][0] <= methods["lora"]["lora_params_end"][0]
    return out
