"""`l1ra compare`: L1RA against LoRA, AdaLoRA and the rows that rule out the easy explanations, on real tasks, at
the same rank budget, data order, steps, learning-rate schedule and seeds, measured side by side.

    l1ra compare --task sentiment --tune --output-dir benchmarks/compare_sentiment   # tune lr on dev, then report
    l1ra compare --task gsm8k --methods lora,l1ra_tuned --seeds 3 --steps 150 --jobs 2
    l1ra compare --task sentiment --quick          # smoke check, minutes

Rows (`--methods`): base (untrained adapters), head_only (classification head alone), lora, adalora (PEFT's
defaults), adalora_paper (AdaLoRA's paper settings for short runs), l1ra (the paper's method at the library
defaults), l1ra_tuned (the short-run setting), l1ra_nol1 (gates, lambda 0), l1ra_gates (gates, lambda 0, no
reallocation), l1ra_prune (prune only), l1ra_params (a budget in LoRA parameters), dora (optional).

Splits: a dev split is carved from the training data (seeded, the same for every run); `--tune` tries a
learning-rate grid per method on it and keeps each method's best dev setting; the reported split is scored once per
final setting and seed. Statistics: per-seed differences against LoRA (same seed = same data order and
initialisation) with a 95% t-interval.

Accumulation: `results.json` in `--output-dir` keeps every run under a hash of its spec; a run whose spec is already
there is not run again, so a comparison can be built over several sittings. `--jobs 2` runs two single-thread runs
side by side (each in its own process).

Fairness: one training loop for every method (`l1ra.app.compare_run.run_one`): AdamW, the same weight-decay rule and
gradient clipping, linear warm-up then cosine decay, the same batches in the same order for a seed, and
`torch.manual_seed(seed)` before the adapter is built. Step time is the wall time of one optimizer step; an
interleaved measurement (every method in one process, one step each in turn) gives the step-time ratios. Memory is
each run's own process's peak RSS (`--in-process` shares one process: not comparable).

This module is light (no torch at import): the CLI parses before anything heavy loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..atomic import atomic_write_json

# The rows, in table order. What each one is:
METHODS = {
    "base": "untrained adapters (LoRA with B = 0): the model before fine-tuning (with a fresh head for classification)",
    "head_only": "the classification head alone, no adapters (classification tasks only)",
    "lora": "PEFT LoRA, rank r in every targeted module",
    "adalora": "PEFT AdaLoRA at PEFT's defaults: init_r 1.5 r -> target_r r, tinit 0, tfinal 0, deltaT 1, "
    "orth_reg_weight 0.5",
    "adalora_paper": "AdaLoRA with its paper's settings for short runs: orth_reg_weight 0.1, deltaT 10, budgeting "
    "from 10% to 80% of the steps",
    "l1ra": "L1RA at the library's defaults (the paper's method: lambda 0.1, eta_c 2e-2, L1 from step 1)",
    "l1ra_tuned": "L1RA at the short-run setting (lambda 0.1, eta_c 0.1, L1 from 25% of the steps; flags override)",
    "l1ra_nol1": "l1ra_tuned with lambda 0: the gates without L1 (ranks still move where a gate's own gradient takes it to 0)",
    "l1ra_gates": "l1ra_tuned with lambda 0 and no reallocation: the gates alone, no rank moves",
    "l1ra_prune": "l1ra_tuned with reassign=False: prune only (SoRA-like)",
    "l1ra_params": "l1ra_tuned with budget_unit='params': the budget counts LoRA parameters, not ranks",
    "dora": "PEFT DoRA (LoraConfig(use_dora=True))",
}
L1RA_METHODS = ("l1ra", "l1ra_tuned", "l1ra_nol1", "l1ra_gates", "l1ra_prune", "l1ra_params")
DEFAULT_METHODS = ("base", "head_only", "lora", "adalora", "adalora_paper", "l1ra", "l1ra_tuned", "l1ra_nol1",
                   "l1ra_gates", "l1ra_prune", "l1ra_params")
LABELS = {
    "base": "untrained", "head_only": "head only", "lora": "LoRA", "adalora": "AdaLoRA (PEFT defaults)",
    "adalora_paper": "AdaLoRA (paper settings)", "l1ra": "L1RA (library defaults)", "l1ra_tuned": "L1RA (tuned)",
    "l1ra_nol1": "L1RA gates, no L1", "l1ra_gates": "L1RA gates, no rank moves", "l1ra_prune": "L1RA prune-only", "l1ra_params": "L1RA, parameter budget",
    "dora": "DoRA",
}
# L1RA's short-run setting: the library defaults shrink a gate by at most 2e-3 per step, so no rank moves in a few
# hundred steps. Chosen on the sentiment dev split (benchmarks/results/sweep_sentiment_dev.json: 500 steps, 2 seeds;
# lambda 0.1 / 0.2 / 0.4 scored 0.817 / 0.809 / 0.794 against LoRA's 0.822): the weakest L1 that still moves rank.
TUNED_L1RA = {"l1ra_lambda": 0.1, "eta_c": 0.1, "l1_start": 0.25}
NO_REALLOCATION = 10**9  # update_every (optimizer steps) for l1ra_gates
# Per-method fields of a RunSpec: everything else is shared by every row.
ADALORA_SETTINGS = {
    "adalora": dict(adalora_init_ratio=1.5, adalora_tinit=0.0, adalora_tfinal=0.0, adalora_delta_t=1,
                    adalora_orth_reg_weight=0.5),
    "adalora_paper": dict(adalora_init_ratio=1.5, adalora_tinit=0.1, adalora_tfinal=0.2, adalora_delta_t=10,
                          adalora_orth_reg_weight=0.1),
}
TARGETS = {"step_ratio": 1.03, "accuracy_points": -0.5, "loss": -0.01}
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


HASH_NEUTRAL_DEFAULTS = {"receiver_signal": "min_gate"}


@dataclass
class RunSpec:
    """Everything one run needs; plain values so it can travel to a worker process as JSON, and be hashed."""

    task: str
    method: str
    seed: int
    steps: int
    batch_size: int
    lr: float
    max_length: int
    eval_limit: Optional[int] = None
    split: str = "test"  # scored on: "dev" (tuning) or "test" (the reported split)
    dev_size: int = 0  # examples carved from the training data as the dev split (also removed from training)
    device: str = "auto"
    rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    threads: int = 1
    # L1RA: None keeps the library's L1RAConfig default
    l1ra_lambda: Optional[float] = None
    eta_c: Optional[float] = None
    update_every: Optional[float] = None
    l1_start: Optional[float] = None
    prune_threshold: Optional[float] = None
    reassign: bool = True
    budget_unit: str = "rank"
    receiver_signal: str = "min_gate"
    # AdaLoRA (fractions of the steps for tinit/tfinal)
    adalora_init_ratio: float = 1.5
    adalora_tinit: float = 0.0
    adalora_tfinal: float = 0.0
    adalora_delta_t: int = 1
    adalora_orth_reg_weight: float = 0.5

    def to_dict(self) -> dict:
        d = asdict(self)
        # Fields added after results were recorded are left out at their default, so recorded runs keep their hash.
        for name, default in HASH_NEUTRAL_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        return d


def spec_hash(spec: RunSpec) -> str:
    """Identity of a run: equal specs give equal results (up to timing), so `compare` runs a spec only once."""
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


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


def parse_lrs(value: str) -> list[float]:
    try:
        lrs = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        lrs = []
    if len(lrs) < 3 or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
        raise argparse.ArgumentTypeError(f"--lr-grid {value!r}: give at least 3 positive learning rates, e.g. 3e-4,1e-3,3e-3")
    return sorted(set(lrs))


def plan_runs(methods: Sequence[str], seeds: Sequence[int]) -> list[tuple[int, str]]:
    """(seed, method) pairs, seed-major, with the method order rotated by one per seed (no method always first)."""
    order = []
    for k, seed in enumerate(seeds):
        shift = k % len(methods)
        for m in list(methods[shift:]) + list(methods[:shift]):
            order.append((seed, m))
    return order


def method_fields(method: str, l1ra_tuned: dict, update_every, prune_threshold) -> dict:
    """The RunSpec fields that make `method` the row it is."""
    if method in ADALORA_SETTINGS:
        return dict(ADALORA_SETTINGS[method])
    if method not in L1RA_METHODS:
        return {}
    shared = dict(update_every=update_every, prune_threshold=prune_threshold)
    if method == "l1ra":  # the library defaults: the paper's method
        return shared
    fields = dict(shared, **l1ra_tuned)
    if method == "l1ra_nol1":
        fields["l1ra_lambda"] = 0.0
    elif method == "l1ra_gates":  # an interval longer than any run: no reallocation ever fires
        fields.update(l1ra_lambda=0.0, update_every=NO_REALLOCATION)
    elif method == "l1ra_prune":
        fields["reassign"] = False
    elif method == "l1ra_params":
        fields["budget_unit"] = "params"
    return fields


@dataclass
class Plan:
    """What a `compare` command runs: the tuning grid on the dev split (may be empty) and the final runs' template."""

    methods: list
    seeds: list
    tune_seeds: list
    lr_grid: list  # empty: no tuning, every method at `common["lr"]`
    common: dict  # RunSpec fields shared by every run
    per_method: dict  # method -> its own RunSpec fields
    tune_extend: int = 0  # grid steps tried beyond an edge where a method's best lr sits (see `beyond_edge`)

    def spec(self, method: str, seed: int, lr: float, split: str) -> RunSpec:
        return RunSpec(method=method, seed=seed, split=split, **dict(self.common, lr=0.0 if method == "base" else lr),
                       **self.per_method[method])

    def tuning_specs(self) -> list[RunSpec]:
        tuned = [m for m in self.methods if m != "base"]  # base trains nothing: no learning rate to tune
        return [self.spec(m, seed, lr, "dev") for seed, m in plan_runs(tuned, self.tune_seeds) for lr in self.lr_grid]

    def final_specs(self, lr_by_method: dict) -> list[RunSpec]:
        return [self.spec(m, s, lr_by_method.get(m, self.common["lr"]), "test") for s, m in plan_runs(self.methods, self.seeds)]


def make_plan(args) -> Plan:
    from .compare_tasks import DEFAULTS

    mode = "quick" if args.quick else "full"
    d = DEFAULTS[args.task][mode]
    seeds = args.seeds if args.seeds is not None else list(range(d.seeds))
    methods = list(args.methods or DEFAULT_METHODS)
    if args.task != "sentiment" and args.methods is None:
        methods.remove("head_only")  # a classification row
    if args.dora and "dora" not in methods:
        methods.append("dora")
    if "lora" not in methods:
        raise ValueError("--methods must include lora: every ratio and paired difference is taken against it")
    if "head_only" in methods and args.task != "sentiment":
        raise ValueError(f"--methods head_only: task {args.task!r} has no classification head; drop head_only")
    steps = args.steps or d.steps
    if steps < 2:
        raise ValueError(f"--steps {steps}: use at least 2 optimizer steps")
    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs}: use 1 or more")
    if args.jobs > 1 and args.in_process:
        raise ValueError("--jobs > 1 runs each run in its own process; drop --in-process")
    dev_size = args.dev_size if args.dev_size is not None else d.dev_size
    lr_grid = list(args.lr_grid or d.lr_grid) if args.tune else []
    if args.tune and dev_size <= 0:
        raise ValueError("--tune needs a dev split: --dev-size must be > 0")
    tuned = dict(TUNED_L1RA, **d.l1ra)
    for key in ("l1ra_lambda", "eta_c", "l1_start"):
        if getattr(args, key) is not None:
            tuned[key] = getattr(args, key)
    common = dict(
        task=args.task,
        steps=steps,
        batch_size=args.batch_size or d.batch_size,
        lr=args.lr or d.lr,
        max_length=args.max_length or d.max_length,
        eval_limit=args.eval_limit if args.eval_limit is not None else d.eval_limit,
        dev_size=dev_size,
        device=args.device,
        rank=args.rank,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.rank,
        lora_dropout=args.lora_dropout,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm,
        threads=args.threads,
    )
    per_method = {}
    for m in methods:
        fields = method_fields(m, tuned, args.update_every, args.prune_threshold)
        if m == "adalora_paper" and args.adalora_delta_t is not None:
            fields["adalora_delta_t"] = args.adalora_delta_t
        per_method[m] = fields
    tune_seeds = seeds[: args.tune_seeds]
    if args.tune_extend < 0:
        raise ValueError(f"--tune-extend {args.tune_extend}: use 0 or more")
    return Plan(methods=methods, seeds=seeds, tune_seeds=tune_seeds, lr_grid=lr_grid, common=common,
                tune_extend=args.tune_extend,
                per_method=per_method)


def make_specs(args) -> list[RunSpec]:
    """The final runs of a command without tuning (every method at the same lr)."""
    plan = make_plan(args)
    return plan.final_specs({})


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
        src = str(Path(__file__).resolve().parents[2])
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


def load_results(output_dir: Path) -> dict:
    """The comparison so far (empty if none): runs are kept across sittings."""
    path = Path(output_dir) / "results.json"
    if path.is_file():
        results = json.loads(path.read_text())
        results.setdefault("sittings", [])
        results.setdefault("failures", [])
        results.setdefault("tuning", {})
        results.setdefault("final", {})
        return results
    return {"sittings": [], "runs": [], "failures": [], "tuning": {}, "final": {}}


def run_specs(specs: list, results: dict, output_dir: Path, *, isolate: bool, jobs: int, log) -> list[dict]:
    """Run every spec not already in `results` (by spec hash), `jobs` at a time, writing results.json after each
    run. Returns the runs of `specs` (old and new) in the order of `specs`."""
    from .compare_run import run_one

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
                run = run_one(spec)
        except Exception as exc:  # keep the other runs; report the failure
            with lock:
                results["failures"].append({"method": spec.method, "seed": spec.seed, "split": spec.split,
                                            "spec_hash": spec_hash(spec), "error": str(exc)})
                _write_json(output_dir / "results.json", results)
            log(f"{tag}: FAILED: {exc}")
            return
        with lock:
            results["runs"].append(run)
            done[run["spec_hash"]] = run
            _write_json(output_dir / "results.json", results)
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


def pick_best(runs: list[dict]) -> dict:
    """{method: {"grid": {lr: mean dev score}, "best_lr": lr}} from dev-split runs (ties: the smaller lr)."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mr = [r for r in runs if r["method"] == method]
        sign = 1 if mr[0]["higher_is_better"] else -1
        grid = {}
        for lr in sorted({r["spec"]["lr"] for r in mr}):
            grid[lr] = statistics.fmean(r["score"] for r in mr if r["spec"]["lr"] == lr)
        best = max(grid, key=lambda lr: (sign * grid[lr], -lr))
        out[method] = {"grid": {repr(lr): v for lr, v in grid.items()}, "best_lr": best,
                       "seeds": sorted({r["seed"] for r in mr}), "score_name": mr[0]["score_name"]}
    return out


def beyond_edge(scores: dict, higher_is_better: bool) -> Optional[float]:
    """The next lr to try when the best of `scores` ({lr: dev score}) is at an edge of the lrs tried: one step of the
    grid's outermost ratio beyond it (3 significant digits); None when the best lies inside. The bottom edge counts
    only when strictly better than its neighbour (ties go to the smaller lr)."""
    lrs = sorted(scores)
    if len(lrs) < 2:
        return None
    sign = 1 if higher_is_better else -1
    best = max(lrs, key=lambda lr: (sign * scores[lr], -lr))
    if best == lrs[-1]:
        return float(f"{lrs[-1] * lrs[-1] / lrs[-2]:.3g}")
    if best == lrs[0] and sign * scores[lrs[0]] > sign * scores[lrs[1]]:
        return float(f"{lrs[0] * lrs[0] / lrs[1]:.3g}")
    return None


def run_compare(
    specs_or_plan, output_dir: Path, *, isolate: bool = True, command: str = "", log=print, timing_steps: int = 0,
    jobs: int = 1,
) -> dict:
    """Tune (if the plan has a grid), run the final specs, then (with `timing_steps`) the interleaved step timing,
    then write results.md and the figure. Runs already in `output_dir/results.json` are reused."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "logs").mkdir(exist_ok=True)
    results = load_results(output_dir)
    plan = specs_or_plan if isinstance(specs_or_plan, Plan) else None
    first = plan.spec(plan.methods[0], plan.seeds[0], plan.common["lr"], "test") if plan else specs_or_plan[0]
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
    t0 = time.perf_counter()
    task = first.task
    if plan is not None:
        lr_by_method = {}
        if plan.lr_grid:
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
        specs = plan.final_specs(lr_by_method)
    else:
        specs = list(specs_or_plan)
    final_runs = run_specs(specs, results, output_dir, isolate=isolate, jobs=jobs, log=log)
    # every sitting adds its rows (a row's latest setting wins, see `final_runs`)
    previous = results["final"].get(task, [])
    results["final"][task] = previous + [r["spec_hash"] for r in final_runs if r["spec_hash"] not in previous]
    if timing_steps and any(s.method != "base" for s in specs):
        # Step time, second measurement: every row of the table (this sitting's and earlier ones') in one process,
        # one step each in turn, so all its ratios come from one machine state.
        tspecs = timing_specs(results, task, timing_steps)
        methods = [s.method for s in tspecs]
        seed = tspecs[0].seed
        key = hashlib.sha256("".join(spec_hash(s) for s in tspecs).encode()).hexdigest()[:16]
        old = results.get("step_timing", {}).get(task)
        if old and old.get("key") == key:
            log("interleaved step timing: already measured for these specs")
        else:
            log(f"interleaved step timing: {', '.join(methods)}, {timing_steps} steps each, one process ...")
            try:
                if isolate:
                    timing = run_isolated(tspecs, output_dir / "logs" / "step-timing.log")
                else:
                    from .compare_run import interleaved_step_times

                    timing = interleaved_step_times(tspecs)
                timing["key"] = key
                results.setdefault("step_timing", {})[task] = timing
                log("interleaved step time / LoRA: " + ", ".join(
                    f"{m} {v['ratio_median']:.3f}" for m, v in timing["methods"].items()))
            except Exception as exc:
                results["failures"].append({"method": "step-timing", "seed": seed, "error": str(exc)})
                log(f"interleaved step timing FAILED: {exc}")
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


def _setting(run: dict) -> str:
    spec = dict(run["spec"])
    spec.pop("seed")
    spec.pop("threads", None)
    return json.dumps(spec, sort_keys=True)


def final_runs(results: dict) -> list[dict]:
    """The reported runs: the final runs of every sitting (`results["final"]`; for a row run in several settings,
    only its latest setting), else every test-split run."""
    by_hash = {r.get("spec_hash"): r for r in results["runs"]}
    chosen = []
    for task, hashes in results.get("final", {}).items():
        runs = [by_hash[h] for h in hashes if h in by_hash]
        latest = {r["method"]: _setting(r) for r in runs}  # later sittings come later in the list
        chosen += [r for r in runs if _setting(r) == latest[r["method"]]]
    tasks = set(results.get("final", {}))
    chosen += [r for r in results["runs"] if r.get("split", "test") == "test" and r["task"] not in tasks]
    return chosen


def write_reports(results: dict, output_dir: Path, log=print) -> dict:
    """Summarise the reported runs and (re)write results.json, results.md and one PNG per task."""
    output_dir = Path(output_dir)
    results["summary"] = summarize(final_runs(results), results.get("step_timing"))
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
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj)


# ------------------------------------------------------------------------------------------------ statistics


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
        out[task] = {"methods": methods, "targets": check_targets(methods),
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


# ------------------------------------------------------------------------------------------------ reports


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


def render_markdown(results: dict) -> str:
    lines = ["# l1ra compare", ""]
    for sitting in results.get("sittings", []):
        if sitting.get("command"):
            lines.append(f"- `{sitting['command']}` ({sitting['date']}, {sitting.get('jobs', 1)} job(s))")
    if results.get("command"):
        lines.append(f"- `{results['command']}`")
    m = results["machine"]
    lines += [
        "",
        f"Last sitting: {results['date']}. Machine: {m['cpu_count']} CPU cores ({m['processor']})"
        + (f", GPU {m['cuda']}" if m.get("cuda") else "")
        + f", torch {m['torch']} with {m['torch_threads']} threads, transformers {m['transformers']}, peft {m['peft']}. "
        f"Memory: {results['memory_method']}.",
        "",
    ]
    for task, summ in results.get("summary", {}).items():
        runs = [r for r in final_runs(results) if r["task"] == task]
        spec = runs[0]["spec"]
        first = next(iter(summ["methods"].values()))
        arrow = "higher is better" if first["higher_is_better"] else "lower is better"
        splits = summ.get("splits") or {}
        split_text = "; ".join(f"{k}: {v['name']} ({v['size']})" for k, v in splits.items())
        tuning = results.get("tuning", {}).get(task)
        lines += [
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
               "one process, one step each in turn"
               if first.get("step_ratio_source") == "interleaved" or any(
                   s.get("step_ratio_source") == "interleaved" for s in summ["methods"].values()) else
               "Step time / LoRA: per-seed median step time of the separate runs divided by LoRA's, averaged")
            + "; memory / LoRA: per-seed peak RSS of each run's own process divided by LoRA's. LoRA params: the "
            "A rows and B columns of the ranks that act on the output." + _l1ra_settings(runs),
            "",
        ]
        score_col = f"{first['score_name']} ({'↑' if first['higher_is_better'] else '↓'})"
        unit = "points" if first["score_name"] == "accuracy" else first["score_name"]
        header = ["method", "lr", "seeds", score_col, f"vs LoRA ({unit}, 95% CI)", "step time / LoRA",
                  "peak RSS (MiB)", "memory / LoRA", "LoRA params", "ranks moved"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
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
        lines.append("")
        if tuning:
            grid = sorted({float(k) for t in tuning.values() for k in t["grid"]})
            lines += [f"Tuning on the dev split ({first['score_name']}, mean over seeds "
                      f"{sorted({s for t in tuning.values() for s in t['seeds']})}; ** = chosen):", "",
                      "| method | " + " | ".join(f"lr {lr:g}" for lr in grid) + " |", "|" + "---|" * (len(grid) + 1)]
            for method, t in tuning.items():
                cells = []
                for lr in grid:
                    v = t["grid"].get(repr(lr))
                    cells.append("–" if v is None else (f"**{v:.4f}**" if lr == t["best_lr"] else f"{v:.4f}"))
                lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
            lines.append("")
        types = list(dict.fromkeys(t for s in summ["methods"].values() for t in s["rank_by_type"]))
        if types:
            lines += [
                "Final effective rank per module type (mean over layers and seeds):",
                "",
                "| method | " + " | ".join(types) + " | total |",
                "|" + "---|" * (len(types) + 2),
            ]
            for method, s in summ["methods"].items():
                if not s["rank_by_type"]:
                    continue
                lines.append(
                    f"| {s['label']} | "
                    + " | ".join(f"{s['rank_by_type'].get(t, 0):.2f}" for t in types)
                    + f" | {s['total_rank_effective'][0]:.0f} |"
                )
            lines.append("")
        if summ["targets"]:
            names = {
                "l1ra_tuned_ci_low_above_floor": "tuned L1RA vs LoRA, 95% CI low end above "
                + ("-0.5 points" if first["score_name"] == "accuracy" else "-0.01"),
                "l1ra_tuned_ci_low_above_0": "tuned L1RA vs LoRA, 95% CI low end above 0",
                "l1ra_tuned_step_ratio_le_1.03": "tuned L1RA step time ≤ 1.03× LoRA",
                "l1ra_params_params_le_lora": "l1ra_params LoRA parameters ≤ LoRA's",
            }
            lines += ["Targets (as measured): " + "; ".join(
                f"{names[k]}: {'met' if v else 'MISSED' if v is not None else 'not measurable (too few seeds)'}"
                for k, v in summ["targets"].items()
            ) + ".", ""]
        lines += ["Rows: " + "; ".join(f"{s['label']}: {s['description']}" for s in summ["methods"].values()) + ".", ""]
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


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=["sentiment", "gsm8k", "tiny"],
                   help="sentiment: MiniLM on Rotten Tomatoes, SST-2 accuracy; gsm8k: SmolLM2-135M-Instruct, held-out "
                        "answer loss; tiny: a random tiny model (seconds, for smoke tests)")
    p.add_argument("--output-dir", type=Path, default=None, help="where results.json/.md and the PNG go "
                   "(default: compare-<task>); runs already in its results.json (same spec) are not run again")
    p.add_argument("--methods", type=parse_methods, default=None,
                   help=f"comma list from {', '.join(METHODS)} (default: all but dora; head_only on sentiment only)")
    p.add_argument("--dora", action="store_true", help="also run DoRA (PEFT)")
    p.add_argument("--seeds", type=parse_seeds, default=None, help="a count (3 -> seeds 0,1,2) or a list (0,5,7); "
                   "default 5 for sentiment, 3 for gsm8k (1 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: per task)")
    p.add_argument("--quick", action="store_true", help="short smoke run: 1 seed, few steps")
    p.add_argument("--tune", action="store_true",
                   help="first run a learning-rate grid per method on the dev split and use each method's best")
    p.add_argument("--lr-grid", type=parse_lrs, default=None, help="--tune's learning rates, e.g. 3e-4,1e-3,3e-3 "
                   "(default: per task, at least 3)")
    p.add_argument("--tune-extend", type=int, default=2,
                   help="--tune: while a method's best lr is at an edge of what it tried, try one grid step beyond, "
                   "up to this many times per method (default 2; 0: the grid only)")
    p.add_argument("--tune-seeds", type=int, default=1, help="--tune: how many of the seeds (the first) tune (default 1)")
    p.add_argument("--dev-size", type=int, default=None,
                   help="examples carved from the training data as the dev split (seeded; default per task)")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side, each in its own process (default 1)")
    p.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="adapter learning rate of every method without --tune")
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
    p.add_argument("--l1ra-lambda", type=float, default=None,
                   help="l1ra_tuned (and its variants): L1 strength (default 0.2; the library's default, used by the "
                        "l1ra row, is 0.1)")
    p.add_argument("--eta-c", type=float, default=None, help="l1ra_tuned: gate learning rate (default 0.1; the "
                   "library's is 2e-2)")
    p.add_argument("--update-every", type=float, default=None,
                   help="every L1RA row: reallocation interval, fraction of steps (<1) or a step count (default: "
                        "L1RAConfig's)")
    p.add_argument("--l1-start", type=float, default=None,
                   help="l1ra_tuned: start the L1 penalty after this fraction of the steps (<1) or this many steps "
                   "(>=1) (default 0.25; the library's is 0, the paper's method)")
    p.add_argument("--prune-threshold", type=float, default=None, help="L1RA prune threshold (default: L1RAConfig's)")
    p.add_argument("--adalora-delta-t", type=int, default=None, help="adalora_paper: deltaT (default 10)")
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
        help="L1RA vs LoRA, AdaLoRA and ablations on real tasks: same budget, data, steps, seeds; tuned on a dev split",
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
    plan = make_plan(args)
    command = "l1ra compare " + shlex.join(list(argv) if argv is not None else _compare_argv())
    print(f"l1ra compare: task {args.task}, {len(plan.methods)} methods x {len(plan.seeds)} seeds, "
          f"{plan.common['steps']} steps each"
          + (f", after tuning {len(plan.lr_grid)} learning rates on the dev split" if plan.lr_grid else "")
          + f" -> {output_dir}", flush=True)
    timing_steps = args.timing_steps if args.timing_steps is not None else (3 if args.quick else 20)
    results = run_compare(plan, output_dir, isolate=not args.in_process, command=command,
                          log=lambda msg: print(msg, flush=True), timing_steps=timing_steps, jobs=args.jobs)
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
