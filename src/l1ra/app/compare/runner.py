"""Running a comparison: each run in its own process (or in this one), `--jobs` at a time, results.json written
after every run; the tuning on the dev split, the final runs, the interleaved step timing, then the reports.
Light: torch is imported only by in-process runs."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from ...atomic import atomic_write_json
from .methods import METHODS
from .plan import Plan, RunSpec, beyond_edge, pick_best, spec_hash
from .render import plot_task, render_markdown
from .results import dev_runs, final_runs, load_results
from .stats import summarize


def run_isolated(spec, log_path: Path, timeout: Optional[float] = None) -> dict:
    """Run one spec (or a list of specs: the interleaved step timing) in a fresh `python -m l1ra.app.compare.worker`
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
        src = str(Path(__file__).resolve().parents[3])
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(log_path, "w") as log:
            proc = subprocess.run(
                [sys.executable, "-m", "l1ra.app.compare.worker", str(spec_path), str(out_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout,
            )
        if proc.returncode != 0 or not out_path.exists():
            tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-15:])
            raise RuntimeError(f"run {spec.method} seed {spec.seed} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out_path.read_text())


def run_specs(specs: list, results: dict, output_dir: Path, *, isolate: bool, jobs: int, log) -> list[dict]:
    """Run every spec not already in `results` (by spec hash), `jobs` at a time, writing results.json after each
    run. Returns the runs of `specs` (old and new) in the order of `specs`."""
    done = {r.get("spec_hash"): r for r in results["runs"]}
    todo = [s for s in specs if spec_hash(s) not in done]
    skipped = len(specs) - len(todo)
    if skipped:
        log(f"{skipped} of {len(specs)} runs already in results.json (same spec): not run again")
    lock = threading.Lock()
    t0 = time.perf_counter()
    counter = iter(range(1, len(todo) + 1))

    def one(spec: RunSpec):
        with lock:
            i = next(counter)
        tag = f"[{i}/{len(todo)}] {spec.task} {spec.method} seed {spec.seed} lr {spec.lr:g} on {spec.split}"
        log(f"{tag}: {spec.steps} steps ...")
        try:
            if isolate:
                name = f"{spec.task}-{spec.method}-seed{spec.seed}-{spec.split}-{spec_hash(spec)}.log"
                run = run_isolated(spec, output_dir / "logs" / name)
            else:
                from .worker import run_one

                run = run_one(spec)
        except Exception as exc:  # keep the other runs; report the failure
            with lock:
                results["failures"].append({"method": spec.method, "seed": spec.seed, "split": spec.split,
                                            "spec_hash": spec_hash(spec), "error": str(exc)})
                atomic_write_json(output_dir / "results.json", results)
            log(f"{tag}: FAILED: {exc}")
            return
        with lock:
            results["runs"].append(run)
            done[run["spec_hash"]] = run
            atomic_write_json(output_dir / "results.json", results)
        step = run["step_time_median_s"]
        log(f"{tag}: {run['score_name']} {run['score']:.4f}"
            + (f", median step {step * 1e3:.0f} ms" if step else "")
            + f", peak RSS {run['peak_rss_mb']:.0f} MiB ({time.perf_counter() - t0:.0f} s elapsed)")

    if jobs > 1:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(one, todo))
    else:
        for spec in todo:
            one(spec)
    return [done[spec_hash(s)] for s in specs if spec_hash(s) in done]


def tune(plan: Plan, results: dict, output_dir: Path, task: str, *, isolate: bool, jobs: int, log) -> dict:
    """The lr grid on the dev split for every row, looking beyond an edge of the grid while the best sits there;
    records the tuning in `results` and returns {method: best dev lr}."""
    log(f"tuning: lr grid {plan.lr_grid} x {len(plan.methods)} methods on the dev split, seeds {plan.tune_seeds}")
    dev_runs = run_specs(plan.tuning_specs(), results, output_dir, isolate=isolate, jobs=jobs, log=log)
    for _ in range(plan.tune_extend):  # a best lr at the grid's edge may not be the best: look one step out
        extra = []
        for method, b in pick_best(dev_runs).items():
            scores = {float(k): v for k, v in b["grid"].items()}
            lr = beyond_edge(scores, next(r["higher_is_better"] for r in dev_runs if r["method"] == method))
            if lr is not None:
                log(f"tuning: {method}'s best lr {b['best_lr']:g} is at an edge of {sorted(scores)}; trying {lr:g}")
                extra += [plan.spec(method, seed, lr, "dev") for seed in plan.tune_seeds]
        if not extra:
            break
        dev_runs += run_specs(extra, results, output_dir, isolate=isolate, jobs=jobs, log=log)
    best = pick_best(dev_runs)
    results["tuning"].setdefault(task, {}).update(best)  # other sittings may have tuned other rows
    lr_by_method = {m: b["best_lr"] for m, b in best.items()}
    log("best dev lr: " + ", ".join(f"{m} {lr:g}" for m, lr in lr_by_method.items()))
    return lr_by_method


def step_timing(results: dict, output_dir: Path, task: str, timing_steps: int, *, isolate: bool, log) -> None:
    """Step time, second measurement: every row of the table (this sitting's and earlier ones') in one process, one
    step each in turn, so all its ratios come from one machine state. Skipped when these specs were measured."""
    tspecs = timing_specs(results, task, timing_steps)
    if not tspecs:  # every run of the task failed: its failures are the report
        log("interleaved step timing: no trained run to time")
        return
    methods = [s.method for s in tspecs]
    key = hashlib.sha256("".join(spec_hash(s) for s in tspecs).encode()).hexdigest()[:16]
    old = results.get("step_timing", {}).get(task)
    if old and old.get("key") == key:
        log("interleaved step timing: already measured for these specs")
        return
    log(f"interleaved step timing: {', '.join(methods)}, {timing_steps} steps each, one process ...")
    try:
        if isolate:
            timing = run_isolated(tspecs, output_dir / "logs" / "step-timing.log")
        else:
            from .worker import interleaved_step_times

            timing = interleaved_step_times(tspecs)
        timing["key"] = key
        results.setdefault("step_timing", {})[task] = timing
        log("interleaved step time / LoRA: " + ", ".join(
            f"{m} {v['ratio_median']:.3f}" for m, v in timing["methods"].items()))
    except Exception as exc:
        results["failures"].append({"method": "step-timing", "seed": tspecs[0].seed, "error": str(exc)})
        log(f"interleaved step timing FAILED: {exc}")


def _open_sitting(results: dict, first: RunSpec, command: str, isolate: bool, jobs: int) -> None:
    results["sittings"].append({
        "command": command,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(first.threads),
        "jobs": jobs,
        "isolated_processes": isolate,
    })
    results["date"] = results["sittings"][-1]["date"]
    results["machine"] = results["sittings"][-1]["machine"]
    results["memory_method"] = (
        "peak RSS (VmHWM) of the run's own process, read after training, before evaluation"
        + (f"; {jobs} runs side by side, so step times share the machine" if jobs > 1 else "")
        if isolate else
        "peak RSS of the shared process (in-process mode: only grows, NOT comparable between methods)"
    )


def run_compare(
    specs_or_plan, output_dir: Path, *, isolate: bool = True, command: str = "", log=print, timing_steps: int = 0,
    jobs: int = 1, dev_only: bool = False,
) -> dict:
    """Tune (if the plan has a grid), run the final specs, then (with `timing_steps`) the interleaved step timing,
    then write results.md and the figure. Runs already in `output_dir/results.json` are reused. `dev_only`: stop
    after the tuning (nothing is scored on the reported split)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "logs").mkdir(exist_ok=True)
    results = load_results(output_dir)
    plan = specs_or_plan if isinstance(specs_or_plan, Plan) else None
    first = plan.spec(plan.methods[0], plan.seeds[0], plan.common["lr"], "test") if plan else specs_or_plan[0]
    _open_sitting(results, first, command, isolate, jobs)
    t0 = time.perf_counter()
    task = first.task
    if plan is not None:
        lr_by_method = {}
        if plan.lr_grid:
            lr_by_method = tune(plan, results, output_dir, task, isolate=isolate, jobs=jobs, log=log)
        if plan.dev_seeds:
            dev = run_specs(plan.dev_specs(lr_by_method), results, output_dir, isolate=isolate, jobs=jobs, log=log)
            by_method = results.setdefault("dev", {}).setdefault(task, {})
            for method in dict.fromkeys(r["method"] for r in dev):  # a row's latest sitting wins
                by_method[method] = [r["spec_hash"] for r in dev if r["method"] == method]
        specs = [] if dev_only else plan.final_specs(lr_by_method)
    else:
        specs = list(specs_or_plan)
    runs = run_specs(specs, results, output_dir, isolate=isolate, jobs=jobs, log=log)
    # every sitting adds its rows (a row's latest setting wins, see `final_runs`)
    previous = results["final"].get(task, [])
    results["final"][task] = previous + [r["spec_hash"] for r in runs if r["spec_hash"] not in previous]
    if timing_steps and any(s.method != "base" for s in specs):
        step_timing(results, output_dir, task, timing_steps, isolate=isolate, log=log)
    results["sittings"][-1]["wall_s"] = time.perf_counter() - t0
    write_reports(results, output_dir, log=log)
    return results


def timing_specs(results: dict, task: str, timing_steps: int) -> list[RunSpec]:
    """The interleaved step timing's specs: one per trained row reported for `task` (LoRA first, then the table's
    order), at the row's reported setting and its lowest seed, `timing_steps` steps plus one warm-up step."""
    runs = sorted((r for r in final_runs(results) if r["task"] == task and r["method"] != "base"),
                  key=lambda r: r["seed"])
    first = {}
    for r in runs:
        first.setdefault(r["method"], r)
    order = ["lora"] + [m for m in METHODS if m != "lora"]
    return [dataclasses.replace(RunSpec(**first[m]["spec"]), steps=timing_steps + 1) for m in order if m in first]


def write_reports(results: dict, output_dir: Path, log=print) -> dict:
    """Summarise the reported runs and (re)write results.json, results.md and one PNG per task."""
    output_dir = Path(output_dir)
    results["summary"] = summarize(final_runs(results), results.get("step_timing"))
    results["dev_summary"] = summarize(dev_runs(results))
    atomic_write_json(output_dir / "results.json", results)
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
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
