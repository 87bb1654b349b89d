"""`l1ra compare`: L1RA against LoRA and AdaLoRA (and the prune-only ablation, DoRA optionally) on real tasks, at
the same rank budget, data order, steps, learning-rate schedule and seeds, measured side by side.

    l1ra compare --task sentiment --output-dir runs/compare-sentiment
    l1ra compare --task gsm8k --seeds 2 --steps 40
    l1ra compare --task sentiment --quick          # smoke check, minutes

Fairness: every run uses one training loop (`l1ra.app.compare_run.run_one`): AdamW with the same adapter learning
rate, weight-decay rule and gradient clipping, linear warm-up then cosine decay, the same batches in the same order
for a given seed, and `torch.manual_seed(seed)` before the adapter is built. Runs are interleaved (for each seed,
every method, in an order rotated by seed) so that machine noise hits all methods alike; step-time and memory
ratios to LoRA are taken per seed, then averaged.

Measurement: each run gets its own Python process (unless `--in-process`), so the peak resident memory
(`getrusage` `ru_maxrss`, read after training and before evaluation) is that run's own. Step time is the wall time
of one optimizer step (forward, backward, clipping, `optimizer.step()`, the method's per-step hook, scheduler,
`zero_grad`); the median over steps is reported.

Writes `results.json` (every run, every figure), `results.md` (a table per task) and `<task>.png` (score against
step-time ratio; rank per module type for L1RA vs AdaLoRA) into `--output-dir`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from ..atomic import atomic_write_json
from .compare_run import DEFAULT_METHODS, METHODS, RunSpec

LABELS = {
    "lora": "LoRA",
    "adalora": "AdaLoRA",
    "l1ra": "L1RA",
    "l1ra_prune": "L1RA prune-only",
    "dora": "DoRA",
}
TARGETS = {"step_ratio": 1.03, "mem_ratio": 1.02}


# ------------------------------------------------------------------------------------------------ planning


def parse_seeds(value: str) -> list[int]:
    """'3' -> [0, 1, 2]; '0,5,7' -> [0, 5, 7]."""
    value = str(value).strip()
    try:
        if "," in value:
            seeds = [int(v) for v in value.split(",") if v.strip()]
        else:
            n = int(value)
            if n < 1:
                raise ValueError
            seeds = list(range(n))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds {value!r}: give a count (e.g. 3, meaning seeds 0,1,2) or a comma list (e.g. 0,5,7)"
        ) from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds {value!r} repeats a seed")
    return seeds


def parse_methods(value: str) -> list[str]:
    methods = [m.strip().lower().replace("-", "_") for m in value.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise argparse.ArgumentTypeError(
            f"--methods {value!r}: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(METHODS)}"
        )
    return list(dict.fromkeys(methods))


def plan_runs(methods: Sequence[str], seeds: Sequence[int]) -> list[tuple[int, str]]:
    """(seed, method) pairs, seed-major, with the method order rotated by one per seed (no method always first)."""
    order = []
    for k, seed in enumerate(seeds):
        shift = k % len(methods)
        for m in list(methods[shift:]) + list(methods[:shift]):
            order.append((seed, m))
    return order


def make_specs(args) -> list[RunSpec]:
    from .compare_tasks import DEFAULTS

    mode = "quick" if args.quick else "full"
    d = DEFAULTS[args.task][mode]
    seeds = args.seeds if args.seeds is not None else list(range(d.seeds))
    methods = list(args.methods or DEFAULT_METHODS)
    if args.dora and "dora" not in methods:
        methods.append("dora")
    if "lora" not in methods:
        raise ValueError("--methods must include lora: every ratio is taken against it")
    steps = args.steps or d.steps
    if steps < 2:
        raise ValueError(f"--steps {steps}: use at least 2 optimizer steps")
    common = dict(
        task=args.task,
        steps=steps,
        batch_size=args.batch_size or d.batch_size,
        lr=args.lr or d.lr,
        max_length=args.max_length or d.max_length,
        eval_limit=args.eval_limit if args.eval_limit is not None else d.eval_limit,
        rank=args.rank,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.rank,
        lora_dropout=args.lora_dropout,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm,
        threads=args.threads,
        l1ra_lambda=args.l1ra_lambda if args.l1ra_lambda is not None else d.l1ra.get("l1ra_lambda"),
        eta_c=args.eta_c if args.eta_c is not None else d.l1ra.get("eta_c"),
        update_every=args.update_every,
        l1_start=args.l1_start if args.l1_start is not None else d.l1ra.get("l1_start"),
        prune_threshold=args.prune_threshold,
        adalora_delta_t=args.adalora_delta_t,
    )
    return [RunSpec(method=m, seed=s, **common) for s, m in plan_runs(methods, seeds)]


# ------------------------------------------------------------------------------------------------ running


def run_isolated(spec, log_path: Path, timeout: Optional[float] = None) -> dict:
    """Run one spec (or a list of specs: the interleaved step timing) in a fresh `python -m l1ra.app.compare_run`
    process; its stdout/stderr go to `log_path`."""
    specs = spec if isinstance(spec, list) else [spec]
    with tempfile.TemporaryDirectory(prefix="l1ra-compare-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps([s.to_dict() for s in spec] if isinstance(spec, list) else spec.to_dict()))
        spec = specs[0]
        env = dict(os.environ)
        env.update(
            HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
            OMP_NUM_THREADS=str(spec.threads), TOKENIZERS_PARALLELISM="false",
        )
        src = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(log_path, "w") as log:
            proc = subprocess.run(
                [sys.executable, "-m", "l1ra.app.compare_run", str(spec_path), str(out_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout,
            )
        if proc.returncode != 0 or not out_path.exists():
            tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-15:])
            raise RuntimeError(f"run {spec.method} seed {spec.seed} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out_path.read_text())


def run_compare(
    specs: list[RunSpec], output_dir: Path, *, isolate: bool = True, command: str = "", log=print,
    timing_steps: int = 0,
) -> dict:
    """Run every spec (in order), writing `results.json` after each run, then (with `timing_steps`) the interleaved
    step timing of all methods in one process, then `results.md` and the figure."""
    from .compare_run import interleaved_step_times, run_one

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "logs").mkdir(exist_ok=True)
    results = {
        "command": command,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(specs[0].threads if specs else None),
        "isolated_processes": isolate,
        "memory_method": (
            "peak RSS (getrusage ru_maxrss) of the run's own process, read after training, before evaluation"
            if isolate else
            "peak RSS of the shared process (in-process mode: only grows, NOT comparable between methods)"
        ),
        "runs": [],
        "failures": [],
    }
    t0 = time.perf_counter()
    for i, spec in enumerate(specs, 1):
        tag = f"[{i}/{len(specs)}] {spec.task} {spec.method} seed {spec.seed}"
        log(f"{tag}: {spec.steps} steps ...")
        try:
            if isolate:
                run = run_isolated(spec, output_dir / "logs" / f"{spec.task}-{spec.method}-seed{spec.seed}.log")
            else:
                run = run_one(spec)
        except Exception as exc:  # keep the other runs; report the failure
            results["failures"].append({"method": spec.method, "seed": spec.seed, "error": str(exc)})
            log(f"{tag}: FAILED: {exc}")
            _write_json(output_dir / "results.json", results)
            continue
        results["runs"].append(run)
        log(
            f"{tag}: {run['score_name']} {run['score']:.4f}, median step {run['step_time_median_s'] * 1e3:.0f} ms, "
            f"peak RSS {run['peak_rss_mb']:.0f} MiB ({time.perf_counter() - t0:.0f} s elapsed)"
        )
        _write_json(output_dir / "results.json", results)
    if timing_steps and specs:
        # Step time, second measurement: every method in one process, one step each in turn.
        import dataclasses

        seed = specs[0].seed
        methods = ["lora"] + [m for m in dict.fromkeys(s.method for s in specs) if m != "lora"]
        base = next(s for s in specs if s.seed == seed)
        tspecs = [dataclasses.replace(base, method=m, steps=timing_steps + 1) for m in methods]
        log(f"interleaved step timing: {', '.join(methods)}, {timing_steps} steps each, one process ...")
        try:
            timing = (run_isolated(tspecs, output_dir / "logs" / "step-timing.log") if isolate
                      else interleaved_step_times(tspecs))
            results["step_timing"] = {specs[0].task: timing}
            log("interleaved step time / LoRA: " + ", ".join(
                f"{m} {v['ratio_median']:.3f}" for m, v in timing["methods"].items()))
        except Exception as exc:
            results["failures"].append({"method": "step-timing", "seed": seed, "error": str(exc)})
            log(f"interleaved step timing FAILED: {exc}")
    results["total_wall_s"] = time.perf_counter() - t0
    write_reports(results, output_dir, log=log)
    return results


def write_reports(results: dict, output_dir: Path, log=print) -> dict:
    """Summarise `results["runs"]` and (re)write results.json, results.md and one PNG per task."""
    output_dir = Path(output_dir)
    results["summary"] = summarize(results["runs"], results.get("step_timing"))
    _write_json(output_dir / "results.json", results)
    (output_dir / "results.md").write_text(render_markdown(results))
    for task in results["summary"]:
        try:
            plot_task(results, task, output_dir / f"{task}.png")
        except Exception as exc:  # a missing matplotlib must not lose the measurements
            log(f"figure for {task} not written: {exc}")
    return results


def machine_info(threads: Optional[int]) -> dict:
    import peft
    import torch
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def _write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj)


# ------------------------------------------------------------------------------------------------ summary


def _mean_std(values: list) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict], step_timing: Optional[dict] = None) -> dict:
    """{task: {"methods": {method: figures}, "targets": {...}}}; ratios to LoRA are paired by seed. With
    `step_timing` (the interleaved measurement), its per-step ratios are the step-time ratio used for the targets."""
    out = {}
    step_timing = step_timing or {}
    for task in dict.fromkeys(r["task"] for r in runs):
        task_runs = [r for r in runs if r["task"] == task]
        lora = {r["seed"]: r for r in task_runs if r["method"] == "lora"}
        methods = {}
        for method in dict.fromkeys(r["method"] for r in task_runs):
            mr = [r for r in task_runs if r["method"] == method]
            paired = [(r, lora[r["seed"]]) for r in mr if r["seed"] in lora]
            step_ratio = [r["step_time_median_s"] / l["step_time_median_s"] for r, l in paired]
            mem_ratio = [r["peak_rss_mb"] / l["peak_rss_mb"] for r, l in paired]
            growth_ratio = [
                r["train_rss_growth_mb"] / l["train_rss_growth_mb"] for r, l in paired if l["train_rss_growth_mb"] > 0
            ]
            types = sorted({t for r in mr for t in r["rank_by_type"]})
            s = {
                "label": LABELS.get(method, method),
                "n_seeds": len(mr),
                "seeds": [r["seed"] for r in mr],
                "score_name": mr[0]["score_name"],
                "higher_is_better": mr[0]["higher_is_better"],
                "score": _mean_std([r["score"] for r in mr]),
                "step_time_median_s": _mean_std([r["step_time_median_s"] for r in mr]),
                "step_ratio": _mean_std(step_ratio),
                "peak_rss_mb": _mean_std([r["peak_rss_mb"] for r in mr]),
                "mem_ratio": _mean_std(mem_ratio),
                "train_rss_growth_mb": _mean_std([r["train_rss_growth_mb"] for r in mr]),
                "training_state_mb": _mean_std([r.get("training_state_mb") for r in mr]),
                "growth_ratio": _mean_std(growth_ratio),
                "train_wall_s": _mean_std([r["train_wall_s"] for r in mr]),
                "trainable_params_end": _mean_std([r["trainable_params_end"] for r in mr]),
                "effective_params_end": _mean_std([r["effective_params_end"] for r in mr]),
                "total_rank_effective": _mean_std([r["total_rank_effective"] for r in mr]),
                "rank_by_type": {
                    t: statistics.fmean([r["rank_by_type"].get(t, 0.0) for r in mr]) for t in types
                },
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
            if method.startswith("l1ra"):
                s["ranks_moved"] = _mean_std([r["l1ra"]["ranks_added"] for r in mr])
                s["ranks_pruned"] = _mean_std([r["l1ra"]["ranks_pruned"] for r in mr])
            methods[method] = s
        out[task] = {"methods": methods, "targets": check_targets(methods)}
    return out


def _iqr_half(values: list) -> float:
    """Half the interquartile range: the spread shown next to a median."""
    if len(values) < 4:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / 2


def check_targets(methods: dict) -> dict:
    """The issue's targets for L1RA, as measured: True (met), False (missed), None (peer not run)."""
    if "l1ra" not in methods or "lora" not in methods:
        return {}
    l1, lo, ada = methods["l1ra"], methods["lora"], methods.get("adalora")
    sign = 1 if l1["higher_is_better"] else -1

    def at_least(a, b):  # a's score is at least as good as b's
        return sign * (a["score"][0] - b["score"][0]) >= 0

    return {
        "score_ge_lora": at_least(l1, lo),
        "score_ge_adalora": at_least(l1, ada) if ada else None,
        "step_ratio_le_1.03": l1["step_ratio"][0] <= TARGETS["step_ratio"],
        "step_time_below_adalora": (l1["step_ratio"][0] < ada["step_ratio"][0]) if ada else None,
        "mem_ratio_le_1.02": l1["mem_ratio"][0] <= TARGETS["mem_ratio"],
    }


# ------------------------------------------------------------------------------------------------ reports


def _fmt_pm(ms: tuple, digits: int = 4, scale: float = 1.0) -> str:
    m, s = ms
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "n/a"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def _fmt_int(x: float) -> str:
    return f"{x:,.0f}"


def _l1ra_settings(runs: list) -> str:
    cfg = next((r["l1ra"]["config"] for r in runs if "l1ra" in r), None)
    if cfg is None:
        return ""
    start = cfg.get("l1_start", 0)
    return (f" L1RA: lambda {cfg['l1ra_lambda']:g}, eta_c {cfg['eta_c']:g}, L1 from "
            + (f"{start:.0%} of the steps" if isinstance(start, float) and 0 < start < 1 else f"step {int(start) + 1}")
            + ", reallocation every "
            + (f"{cfg['update_every']:.0%} of the steps" if isinstance(cfg["update_every"], float)
               else f"{cfg['update_every']} steps")
            + ".")


def render_markdown(results: dict) -> str:
    lines = ["# l1ra compare", ""]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`  ", ""]
    m = results["machine"]
    lines += [
        f"Date: {results['date']}. Machine: {m['cpu_count']} CPU cores ({m['processor']}), torch {m['torch']} with "
        f"{m['torch_threads']} threads, transformers {m['transformers']}, peft {m['peft']}. "
        f"Memory: {results['memory_method']}.",
        "",
    ]
    for task, summ in results.get("summary", {}).items():
        runs = [r for r in results["runs"] if r["task"] == task]
        spec = runs[0]["spec"]
        first = next(iter(summ["methods"].values()))
        arrow = "higher is better" if first["higher_is_better"] else "lower is better"
        lines += [
            f"## {task}",
            "",
            f"{spec['steps']} steps, batch {spec['batch_size']}, max length {spec['max_length']}, lr {spec['lr']} "
            f"(linear warm-up {spec['warmup_ratio']:.0%}, cosine decay), rank budget r={spec['rank']} per module "
            f"(alpha {spec['lora_alpha']}, dropout {spec['lora_dropout']}), seeds "
            f"{sorted({r['seed'] for r in runs})}. Score: {first['score_name']} ({arrow}), mean ± std over seeds. "
            + ("Step time / LoRA: median of per-step ratios (± half IQR) with every method trained side by side in "
             "one process, one step each in turn"
             if first.get("step_ratio_source") == "interleaved" else
             "Step time / LoRA: per-seed median step time of the separate runs divided by LoRA's, averaged")
            + "; memory / LoRA: per-seed peak RSS of each run's own process divided by LoRA's, averaged. "
            "Median step (ms): from the separate runs. Training state: exact MiB of trainable weights, optimizer "
            "state and AdaLoRA's importance statistics." + _l1ra_settings(runs),
            "",
        ]
        score_col = f"{first['score_name']} ({'↑' if first['higher_is_better'] else '↓'})"
        header = [
            "method", score_col, "median step (ms)", "step time / LoRA", "peak RSS (MiB)", "memory / LoRA",
            "training state (MiB)", "trainable params (effective)", "ranks moved",
        ]
        has_ppl = "perplexity" in first
        if has_ppl:
            header.insert(2, "perplexity")
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method, s in summ["methods"].items():
            row = [
                s["label"],
                _fmt_pm(s["score"], 4),
                _fmt_pm(s["step_time_median_s"], 0, 1e3),
                _fmt_pm(s["step_ratio"], 3),
                _fmt_pm(s["peak_rss_mb"], 0),
                _fmt_pm(s["mem_ratio"], 3),
                _fmt_pm(s["training_state_mb"], 2),
                _fmt_int(s["effective_params_end"][0])
                + ("" if s["effective_params_end"][0] == s["trainable_params_end"][0]
                   else f" (of {_fmt_int(s['trainable_params_end'][0])} allocated)"),
                _fmt_pm(s["ranks_moved"], 1) if "ranks_moved" in s else "–",
            ]
            if has_ppl:
                row.insert(2, _fmt_pm(s["perplexity"], 3))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        # rank distribution per module type
        types = sorted({t for s in summ["methods"].values() for t in s["rank_by_type"]})
        lines += [
            "Final effective rank per module type (mean over layers and seeds):",
            "",
            "| method | " + " | ".join(types) + " | total |",
            "|" + "---|" * (len(types) + 2),
        ]
        for method, s in summ["methods"].items():
            lines.append(
                f"| {s['label']} | "
                + " | ".join(f"{s['rank_by_type'].get(t, 0):.2f}" for t in types)
                + f" | {s['total_rank_effective'][0]:.0f} |"
            )
        lines.append("")
        if summ["targets"]:
            names = {
                "score_ge_lora": "L1RA score ≥ LoRA",
                "score_ge_adalora": "L1RA score ≥ AdaLoRA",
                "step_ratio_le_1.03": "L1RA step time ≤ 1.03× LoRA",
                "step_time_below_adalora": "L1RA step time < AdaLoRA",
                "mem_ratio_le_1.02": "L1RA peak memory ≤ 1.02× LoRA",
            }
            lines += ["Targets (as measured): " + "; ".join(
                f"{names[k]}: {'met' if v else 'MISSED' if v is not None else 'not run'}"
                for k, v in summ["targets"].items()
            ) + ".", ""]
    if results.get("failures"):
        lines += ["## Failed runs", ""] + [f"- {f['method']} seed {f['seed']}: {f['error'][:300]}" for f in results["failures"]] + [""]
    return "\n".join(lines)


def plot_task(results: dict, task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = results["summary"][task]["methods"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for method, s in summ.items():
        (x, xe), (y, ye) = s["step_ratio"], s["score"]
        ax1.errorbar(x, y, xerr=xe, yerr=ye, fmt="o", capsize=4, label=s["label"])
        ax1.annotate(s["label"], (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
    first = next(iter(summ.values()))
    ax1.axvline(1.0, color="grey", lw=0.8, ls=":")
    interleaved = first.get("step_ratio_source") == "interleaved"
    ax1.set_xlabel("step time / LoRA " + ("(interleaved, median ± half IQR)" if interleaved
                                          else "(per-seed ratio of medians, mean ± std)"))
    ax1.set_ylabel(f"{first['score_name']} ({'higher' if first['higher_is_better'] else 'lower'} is better)")
    ax1.set_title(f"{task}: score vs cost")
    ax1.legend(fontsize=8, loc="best")
    shown = [m for m in ("lora", "adalora", "l1ra", "l1ra_prune") if m in summ]
    types = sorted({t for m in shown for t in summ[m]["rank_by_type"]})
    width = 0.8 / max(1, len(shown))
    for k, m in enumerate(shown):
        ax2.bar([i + k * width for i in range(len(types))], [summ[m]["rank_by_type"].get(t, 0) for t in types],
                width=width, label=summ[m]["label"])
    ax2.set_xticks([i + width * (len(shown) - 1) / 2 for i in range(len(types))])
    ax2.set_xticklabels(types, rotation=30, ha="right", fontsize=8)
    ax2.set_ylabel("final effective rank (mean over layers, seeds)")
    ax2.set_title(f"{task}: rank per module type")
    ax2.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"l1ra compare, {results['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .compare_tasks import TASKS

    p.add_argument("--task", required=True, choices=list(TASKS),
                   help="sentiment: MiniLM on Rotten Tomatoes, SST-2 accuracy; gsm8k: SmolLM2-135M-Instruct, held-out "
                        "answer loss; tiny: a random tiny model (seconds, for smoke tests)")
    p.add_argument("--output-dir", type=Path, default=None, help="where results.json/.md and the PNG go "
                   "(default: compare-<task>)")
    p.add_argument("--methods", type=parse_methods, default=None,
                   help=f"comma list from {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--dora", action="store_true", help="also run DoRA (PEFT)")
    p.add_argument("--seeds", type=parse_seeds, default=None, help="a count (3 -> seeds 0,1,2) or a list (0,5,7); "
                   "default 3 (1 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: per task)")
    p.add_argument("--quick", action="store_true", help="short smoke run: 1 seed, few steps (under 15 min on 2 cores)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="adapter learning rate, same for every method")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example")
    p.add_argument("--eval-limit", type=int, default=None, help="score on the first N evaluation examples only")
    p.add_argument("--rank", type=int, default=8, help="rank budget per targeted module (AdaLoRA's target_r)")
    p.add_argument("--lora-alpha", type=int, default=None, help="default: 2 x rank")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (default 1: on a shared machine, more threads make step times "
                        "erratic because OpenMP threads wait for each other; use the core count on a quiet machine)")
    p.add_argument("--l1ra-lambda", type=float, default=None, help="L1RA L1 strength (default: 0.2, the short-run setting; "
                   "the library's L1RAConfig default is 0.1)")
    p.add_argument("--eta-c", type=float, default=None, help="L1RA gate learning rate (default: 0.1; L1RAConfig's is "
                   "2e-2)")
    p.add_argument("--update-every", type=float, default=None,
                   help="L1RA reallocation interval: fraction of steps (<1) or a step count (default: L1RAConfig's)")
    p.add_argument("--l1-start", type=float, default=None,
                   help="L1RA: start the L1 penalty after this fraction of the steps (<1) or this many steps (>=1) "
                   "(default: 0.25; L1RAConfig's is 0, the paper's method)")
    p.add_argument("--prune-threshold", type=float, default=None, help="L1RA prune threshold (default: L1RAConfig's)")
    p.add_argument("--adalora-delta-t", type=int, default=1, help="AdaLoRA deltaT (PEFT default 1)")
    p.add_argument("--timing-steps", type=int, default=None,
                   help="steps of the interleaved step-time measurement (all methods in one process, one step each "
                        "in turn; the step-time ratios come from it); 0 skips it (default: 20, 3 with --quick)")
    p.add_argument("--from-results", type=Path, default=None, metavar="RESULTS_JSON",
                   help="run nothing: rewrite results.md and the figures from the runs in this results.json "
                        "(e.g. of an interrupted comparison) into --output-dir")
    p.add_argument("--in-process", action="store_true",
                   help="run everything in this process (faster start; peak-memory figures are then not per method)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `l1ra compare` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "compare",
        help="L1RA vs LoRA, AdaLoRA (and DoRA) on real tasks: same budget, data, steps, seeds",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(p)
    p.set_defaults(func=run_from_args)
    return p


def run_from_args(args, argv: Optional[Sequence[str]] = None) -> int:
    output_dir = args.output_dir or Path(f"compare-{args.task}")
    if args.from_results:
        # Re-render the reports from the runs already in a results.json (e.g. an interrupted comparison).
        results = json.loads(Path(args.from_results).read_text())
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        results.setdefault("failures", [])
        write_reports(results, output_dir)
        print((Path(output_dir) / "results.md").read_text())
        return 0
    specs = make_specs(args)
    command = "l1ra compare " + shlex.join(list(argv) if argv is not None else _compare_argv())
    n_methods = len({s.method for s in specs})
    print(f"l1ra compare: task {args.task}, {n_methods} methods x {len({s.seed for s in specs})} seeds, "
          f"{specs[0].steps} steps each -> {output_dir}", flush=True)
    timing_steps = args.timing_steps if args.timing_steps is not None else (3 if args.quick else 20)
    results = run_compare(specs, output_dir, isolate=not args.in_process, command=command,
                          log=lambda msg: print(msg, flush=True), timing_steps=timing_steps)
    print((Path(output_dir) / "results.md").read_text())
    return 1 if results["failures"] else 0


def _compare_argv() -> list[str]:
    argv = sys.argv[1:]
    return argv[argv.index("compare") + 1 :] if "compare" in argv else argv


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m l1ra.app.compare ...` (the same as `l1ra compare ...`)."""
    parser = argparse.ArgumentParser(prog="l1ra compare", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args, argv)
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
