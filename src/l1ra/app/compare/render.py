"""The report of `l1ra compare`: results.md (the table per task, the tuning table, ranks per module type, the
targets) and one figure per task."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from .methods import LABELS
from .results import final_runs
from .stats import TARGETS


def _fmt_pm(ms: tuple, digits: int = 4, scale: float = 1.0) -> str:
    m, s = ms
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "n/a"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def _fmt_int(x: float) -> str:
    return f"{x:,.0f}"


def _l1ra_settings(runs: list) -> str:
    cfg = next((r["l1ra"]["config"] for r in runs if r["method"] == "l1ra_tuned" and "l1ra" in r), None)
    if cfg is None:
        return ""
    start = cfg.get("l1_start", 0)
    return (f" L1RA tuned: lambda {cfg['l1ra_lambda']:g}, eta_c {cfg['eta_c']:g}, L1 from "
            + (f"{start:.0%} of the steps" if isinstance(start, float) and 0 < start < 1 else f"step {int(start) + 1}")
            + ", reallocation every "
            + (f"{cfg['update_every']:.0%} of the steps" if isinstance(cfg["update_every"], float)
               else f"{cfg['update_every']} steps")
            + ".")


def _fmt_diff(vs: Optional[dict]) -> str:
    if not vs:
        return "–"
    low, high = vs["ci95"]
    digits = 2 if vs["unit"] == "accuracy points" else 4
    ci = "n/a (1 seed)" if math.isnan(low) else f"[{low:+.{digits}f}, {high:+.{digits}f}]"
    return f"{vs['mean']:+.{digits}f} {ci}"


def _machine_lines(results: dict) -> list:
    lines = ["# l1ra compare", ""]
    for sitting in results.get("sittings", []):
        if sitting.get("command"):
            lines.append(f"- `{sitting['command']}` ({sitting['date']}, {sitting.get('jobs', 1)} job(s))")
    if results.get("command"):
        lines.append(f"- `{results['command']}`")
    m = results["machine"]
    return lines + [
        "",
        f"Last sitting: {results['date']}. Machine: {m['cpu_count']} CPU cores ({m['processor']})"
        + (f", GPU {m['cuda']}" if m.get("cuda") else "")
        + f", torch {m['torch']} with {m['torch_threads']} threads, transformers {m['transformers']}, peft {m['peft']}. "
        f"Memory: {results['memory_method']}.",
        "",
    ]


def _task_intro(task: str, summ: dict, runs: list, tuning: Optional[dict]) -> list:
    spec = next((r["spec"] for r in runs if r["method"] != "base"), runs[0]["spec"])  # base's lr is 0
    first = next(iter(summ["methods"].values()))
    arrow = "higher is better" if first["higher_is_better"] else "lower is better"
    splits = summ.get("splits") or {}
    split_text = "; ".join(f"{k}: {v['name']} ({v['size']})" for k, v in splits.items())
    interleaved = first.get("step_ratio_source") == "interleaved" or any(
        s.get("step_ratio_source") == "interleaved" for s in summ["methods"].values())
    return [
        f"## {task}",
        "",
        f"{spec['steps']} steps, batch {spec['batch_size']}, max length {spec['max_length']} "
        f"(linear warm-up {spec['warmup_ratio']:.0%}, cosine decay), rank budget r={spec['rank']} per module "
        f"(alpha {spec['lora_alpha']}, dropout {spec['lora_dropout']}), device {first.get('device')}, seeds "
        f"{sorted({r['seed'] for r in runs})}. Splits: {split_text}. Score: {first['score_name']} on the test "
        f"split ({arrow}), mean ± std over seeds. "
        + (f"Learning rate: each method at its best dev-split lr from the grid "
           f"{sorted({float(k) for t in tuning.values() for k in t['grid']})} (seeds "
           f"{sorted({s for t in tuning.values() for s in t['seeds']})}); see the tuning table."
           if tuning else f"Learning rate: {spec['lr']:g} for every method (not tuned).")
        + " vs LoRA: the per-seed difference (same seed: same data order and initialisation), mean and 95% "
        "t-interval; positive is better. "
        + ("Step time / LoRA: median of per-step ratios (± half IQR) with every method trained side by side in "
           "one process, one step each in turn" if interleaved else
           "Step time / LoRA: per-seed median step time of the separate runs divided by LoRA's, averaged")
        + "; memory / LoRA: per-seed peak RSS of each run's own process divided by LoRA's. LoRA params: the "
        "A rows and B columns of the ranks that act on the output." + _l1ra_settings(runs),
        "",
    ]


def _main_table(summ: dict) -> list:
    first = next(iter(summ["methods"].values()))
    score_col = f"{first['score_name']} ({'↑' if first['higher_is_better'] else '↓'})"
    unit = "points" if first["score_name"] == "accuracy" else first["score_name"]
    header = ["method", "lr", "seeds", score_col, f"vs LoRA ({unit}, 95% CI)", "step time / LoRA",
              "peak RSS (MiB)", "memory / LoRA", "LoRA params", "ranks moved"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, s in summ["methods"].items():
        trained = method != "base"
        row = [
            s["label"],
            ", ".join(f"{lr:g}" for lr in s["lr"]) if trained else "–",
            str(s["n_seeds"]),
            _fmt_pm(s["score"], 4),
            _fmt_diff(s["vs_lora"]),
            _fmt_pm(s["step_ratio"], 3) if trained else "–",
            _fmt_pm(s["peak_rss_mb"], 0),
            _fmt_pm(s["mem_ratio"], 3) if trained else "–",
            _fmt_int(s["lora_params_end"][0]) if s["lora_params_end"][0] == s["lora_params_end"][0] else "–",
            _fmt_pm(s["ranks_moved"], 1) if "ranks_moved" in s else "–",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def _tuning_table(tuning: Optional[dict], score_name: str) -> list:
    if not tuning:
        return []
    grid = sorted({float(k) for t in tuning.values() for k in t["grid"]})
    lines = [f"Tuning on the dev split ({score_name}, mean over seeds "
             f"{sorted({s for t in tuning.values() for s in t['seeds']})}; ** = chosen):", "",
             "| method | " + " | ".join(f"lr {lr:g}" for lr in grid) + " |", "|" + "---|" * (len(grid) + 1)]
    for method, t in tuning.items():
        cells = []
        for lr in grid:
            v = t["grid"].get(repr(lr))
            cells.append("–" if v is None else (f"**{v:.4f}**" if lr == t["best_lr"] else f"{v:.4f}"))
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return lines + [""]


def _rank_table(summ: dict) -> list:
    types = list(dict.fromkeys(t for s in summ["methods"].values() for t in s["rank_by_type"]))
    if not types:
        return []
    lines = ["Final effective rank per module type (mean over layers and seeds):", "",
             "| method | " + " | ".join(types) + " | total |", "|" + "---|" * (len(types) + 2)]
    for s in summ["methods"].values():
        if s["rank_by_type"]:
            lines.append(f"| {s['label']} | " + " | ".join(f"{s['rank_by_type'].get(t, 0):.2f}" for t in types)
                         + f" | {s['total_rank_effective'][0]:.0f} |")
    return lines + [""]


def _targets(summ: dict, score_name: str) -> list:
    if not summ["targets"]:
        return []
    names = {
        "l1ra_tuned_ci_low_above_floor": "tuned L1RA vs LoRA, 95% CI low end above "
        + ("-0.5 points" if score_name == "accuracy" else "-0.01"),
        "l1ra_tuned_ci_low_above_0": "tuned L1RA vs LoRA, 95% CI low end above 0",
        "l1ra_tuned_step_ratio_le_1.03": "tuned L1RA step time ≤ 1.03× LoRA",
        "l1ra_params_params_le_lora": "l1ra_params LoRA parameters ≤ LoRA's",
    }
    return ["Targets (as measured): " + "; ".join(
        f"{names[k]}: {'met' if v else 'MISSED' if v is not None else 'not measurable (too few seeds)'}"
        for k, v in summ["targets"].items()
    ) + ".", ""]


def render_markdown(results: dict) -> str:
    """results.md: the sittings and machine, then per task its setting, the table, tuning, ranks and targets."""
    lines = _machine_lines(results)
    for task, summ in results.get("summary", {}).items():
        runs = [r for r in final_runs(results) if r["task"] == task]
        score_name = next(iter(summ["methods"].values()))["score_name"]
        tuning = results.get("tuning", {}).get(task)
        lines += _task_intro(task, summ, runs, tuning)
        lines += _main_table(summ) + _tuning_table(tuning, score_name) + _rank_table(summ)
        lines += _targets(summ, score_name)
        lines += ["Rows: " + "; ".join(f"{s['label']}: {s['description']}" for s in summ["methods"].values()) + ".", ""]
    for task, summ in results.get("dev_summary", {}).items():
        seeds = sorted({seed for s in summ["methods"].values() for seed in s["seeds"]})
        lines += [f"## {task}: the dev split, each row at its tuned lr (seeds {seeds})", "",
                  "Decided on before anything is scored on the reported split; step times are separate runs sharing the "
                  "machine.", ""]
        lines += _main_table(summ)
    if results.get("failures"):
        lines += ["## Failed runs", ""] + [
            f"- {f['method']} seed {f['seed']}: {f['error'][:300]}" for f in results["failures"]] + [""]
    return "\n".join(lines)


def plot_task(results: dict, task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = results["summary"][task]["methods"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    # Left: what the comparison is about, each adapter row's paired difference to LoRA with its 95% interval (the
    # untrained model and the head alone sit tens of points lower and would squash the axis: they are in the table).
    rows = [(s["label"], s["vs_lora"]) for m, s in summ.items()
            if s["vs_lora"] and m not in ("base", "head_only")]
    for i, (label, vs) in enumerate(rows):
        low, high = vs["ci95"]
        if low == low:
            ax1.plot([low, high], [i, i], color="C0", lw=2)
        ax1.plot(vs["differences"], [i] * len(vs["differences"]), "x", color="grey", ms=4)
        ax1.plot(vs["mean"], i, "o", color="C0")
    ax1.set_yticks(range(len(rows)))
    ax1.set_yticklabels([label for label, _ in rows], fontsize=8)
    ax1.invert_yaxis()
    ax1.axvline(0.0, color="grey", lw=0.8, ls=":")
    lora = summ.get("lora", next(iter(summ.values())))
    accuracy = lora["score_name"] == "accuracy"
    floor = TARGETS["accuracy_points"] if accuracy else TARGETS["loss"]
    ax1.axvline(floor, color="C3", lw=0.8, ls="--", label=f"target: 95% CI low end above {floor:g}")
    unit = "accuracy points" if accuracy else f"{lora['score_name']}, positive = lower"
    ax1.set_xlabel(f"vs LoRA, {unit} (paired by seed: mean o, 95% CI line, seeds x)")
    ax1.set_title(f"{task}: difference to LoRA")
    ax1.legend(fontsize=8, loc="upper right")
    shown = [m for m in ("lora", "adalora_paper", "adalora", "l1ra_tuned", "l1ra_params", "l1ra") if m in summ][:4]
    types = list(dict.fromkeys(t for m in shown for t in summ[m]["rank_by_type"]))
    width = 0.8 / max(1, len(shown))
    for k, m in enumerate(shown):
        ax2.bar([i + k * width for i in range(len(types))], [summ[m]["rank_by_type"].get(t, 0) for t in types],
                width=width, label=summ[m]["label"])
    ax2.set_xticks([i + width * (len(shown) - 1) / 2 for i in range(len(types))])
    ax2.set_xticklabels(types, rotation=30, ha="right", fontsize=8)
    ax2.set_ylabel("final effective rank (mean over layers, seeds)")
    ax2.set_title(f"{task}: rank per module type")
    ax2.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"l1ra compare, {results['date'][:10]} (test split)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
