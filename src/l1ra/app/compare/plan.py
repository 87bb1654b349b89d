"""What a `l1ra compare` command runs: the run specs (and their keys in results.json), the tuning grid on the dev
split, and the final runs on the reported split. Light: no torch at import."""

from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from ..errors import UserError
from ..schedule import steps_or_fraction
from .methods import DEFAULT_METHODS, TUNED_L1RA, method_fields
from .tasks import CLASSIFICATION_TASKS, DEFAULTS

# Fields added after results were recorded, with their default: left out of a spec's key at that default, so the
# recorded runs keep their key (and are not run again).
HASH_NEUTRAL_DEFAULTS = {
    "receiver_signal": "min_gate", "user_data": None, "new_rank_init": "random", "new_rank_grace": 0.0,
    "capacity_factor": None,
}


class PlanError(UserError, ValueError):
    """A command line that cannot be planned; the message names the flag to change."""


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
    new_rank_init: str = "random"
    new_rank_grace: float = 0.0  # a fraction of the steps (< 1) or a step count
    capacity_factor: Optional[int] = None  # L1RA rows: max_rank = capacity_factor * rank (the fixed-capacity design)
    # AdaLoRA (fractions of the steps for tinit/tfinal)
    adalora_init_ratio: float = 1.5
    adalora_tinit: float = 0.0
    adalora_tfinal: float = 0.0
    adalora_delta_t: int = 1
    adalora_orth_reg_weight: float = 0.5
    # task "dataset" (a user's file): the file, its checksum, the model, the format and the test size (dataset.py)
    user_data: Optional[dict] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        for name, default in HASH_NEUTRAL_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        return d


def spec_hash(spec: RunSpec) -> str:
    """Identity of a run: equal specs give equal results (up to timing), so `compare` runs a spec only once."""
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def plan_runs(methods: Sequence[str], seeds: Sequence[int]) -> list[tuple[int, str]]:
    """(seed, method) pairs, seed-major, with the method order rotated by one per seed (no method always first)."""
    order = []
    for k, seed in enumerate(seeds):
        shift = k % len(methods)
        for m in list(methods[shift:]) + list(methods[:shift]):
            order.append((seed, m))
    return order


def centre_out(values: Sequence[float]) -> list[float]:
    """Sorted values from the middle outwards, the lower neighbour first: [1, 2, 3, 4, 5] -> [3, 2, 4, 1, 5]."""
    vals = sorted(values)
    mid = (len(vals) - 1) // 2
    order = [vals[mid]]
    for k in range(1, len(vals)):
        order += [v for v in (vals[mid - k] if mid - k >= 0 else None, vals[mid + k] if mid + k < len(vals) else None)
                  if v is not None]
    return order


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
    dev_seeds: list = field(default_factory=list)  # each row again on the dev split at its best lr, these seeds

    def dev_specs(self, lr_by_method: dict) -> list[RunSpec]:
        """The dev comparison: every tuned row at its best dev lr, for every dev seed (tuning runs are reused)."""
        rows = [m for m in self.methods if m in lr_by_method]
        return [self.spec(m, seed, lr_by_method[m], "dev") for seed, m in plan_runs(rows, self.dev_seeds)]

    def spec(self, method: str, seed: int, lr: float, split: str) -> RunSpec:
        return RunSpec(method=method, seed=seed, split=split, **dict(self.common, lr=0.0 if method == "base" else lr),
                       **self.per_method[method])

    def tuning_specs(self) -> list[RunSpec]:
        """Learning-rate-major, the grid's centre first: a sitting stopped part-way leaves every method scored at the
        same learning rates, the likeliest best ones first."""
        tuned = [m for m in self.methods if m != "base"]  # base trains nothing: no learning rate to tune
        return [self.spec(m, seed, lr, "dev") for lr in centre_out(self.lr_grid)
                for seed, m in plan_runs(tuned, self.tune_seeds)]

    def final_specs(self, lr_by_method: dict) -> list[RunSpec]:
        return [self.spec(m, s, lr_by_method.get(m, self.common["lr"]), "test")
                for s, m in plan_runs(self.methods, self.seeds)]


def _methods(args, task: str) -> list:
    methods = list(args.methods or DEFAULT_METHODS)
    if task not in CLASSIFICATION_TASKS and args.methods is None:
        methods.remove("head_only")  # a classification row
    if args.dora and "dora" not in methods:
        methods.append("dora")
    if "lora" not in methods:
        raise PlanError("--methods must include lora: every ratio and paired difference is taken against it")
    if "head_only" in methods and task not in CLASSIFICATION_TASKS:
        what = "a causal-LM dataset" if task == "dataset" else f"task {task!r}"
        raise PlanError(f"--methods head_only: {what} has no classification head; drop head_only")
    return methods


def _check_run_shape(args, steps: int, dev_size: int) -> None:
    if steps < 2:
        raise PlanError(f"--steps {steps}: use at least 2 optimizer steps")
    if args.jobs < 1:
        raise PlanError(f"--jobs {args.jobs}: use 1 or more")
    if args.jobs > 1 and args.in_process:
        raise PlanError("--jobs > 1 runs each run in its own process; drop --in-process")
    if getattr(args, "dev_only", False) and not args.tune:
        raise PlanError("--dev-only stops after the tuning runs: add --tune")
    if getattr(args, "dev_seeds", None) and not args.tune:
        raise PlanError("--dev-seeds compares the rows on the dev split at their tuned lr: add --tune")
    if args.tune and dev_size <= 0:
        raise PlanError("--tune needs a dev split: --dev-size must be > 0")
    if args.tune_extend < 0:
        raise PlanError(f"--tune-extend {args.tune_extend}: use 0 or more")


def _user_data(args) -> tuple[Optional[dict], Optional[int]]:
    """(the spec's user_data, the default dev size) for --dataset; (None, None) for a built-in task."""
    if not args.dataset:
        if args.model or any(getattr(args, c) for c in ("prompt_column", "completion_column", "messages_column",
                                                        "text_column")):
            raise PlanError("--model and the column flags go with --dataset (a built-in --task has its own model "
                             "and data)")
        return None, None
    from .dataset import describe_file

    return describe_file(args.dataset, model=args.model, prompt_column=args.prompt_column,
                         completion_column=args.completion_column, messages_column=args.messages_column,
                         text_column=args.text_column)


def make_plan(args) -> Plan:
    """The plan of a parsed `l1ra compare` command line (see cli.add_arguments); PlanError names the flag to fix."""
    task = "dataset" if args.dataset else args.task
    if task is None or (args.dataset and args.task):
        raise PlanError("give one of --task (a built-in task) or --dataset FILE (your data)")
    d = DEFAULTS[task]["quick" if args.quick else "full"]
    methods = _methods(args, task)
    steps = args.steps or d.steps
    user_data, data_dev_size = _user_data(args)
    dev_size = args.dev_size if args.dev_size is not None else (data_dev_size or d.dev_size)
    _check_run_shape(args, steps, dev_size)
    if user_data and not 0 <= dev_size < user_data["rows"] - user_data["test_size"]:
        raise PlanError(f"--dev-size {dev_size}: {args.dataset} has {user_data['rows']} rows, {user_data['test_size']} "
                        "of them held out for the test split; use a dev size below what is left")
    tuned = dict(TUNED_L1RA)
    for key in ("l1ra_lambda", "eta_c", "l1_start"):
        if getattr(args, key) is not None:
            tuned[key] = getattr(args, key)
    # the one rule of `l1ra train` and `l1ra compare` (schedule.py); the values stay as given, so that the specs of
    # recorded runs keep their keys
    steps_or_fraction("--l1-start", tuned["l1_start"])
    steps_or_fraction("--update-every", args.update_every)
    update_every = args.update_every
    common = dict(
        task=task, steps=steps, batch_size=args.batch_size or d.batch_size, lr=args.lr or d.lr,
        max_length=args.max_length or d.max_length,
        eval_limit=args.eval_limit if args.eval_limit is not None else d.eval_limit,
        dev_size=dev_size, device=args.device, rank=args.rank,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.rank,
        lora_dropout=args.lora_dropout, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm, threads=args.threads, user_data=user_data,
    )
    per_method = {}
    for m in methods:
        fields = method_fields(m, tuned, update_every, args.prune_threshold)
        if m == "adalora_paper" and args.adalora_delta_t is not None:
            fields["adalora_delta_t"] = args.adalora_delta_t
        per_method[m] = fields
    seeds = args.seeds if args.seeds is not None else list(range(d.seeds))
    return Plan(methods=methods, seeds=seeds, tune_seeds=seeds[: args.tune_seeds],
                lr_grid=list(args.lr_grid or d.lr_grid) if args.tune else [], common=common,
                per_method=per_method, tune_extend=args.tune_extend,
                dev_seeds=list(range(args.dev_seeds)) if getattr(args, "dev_seeds", None) else [])


# ------------------------------------------------------------------------------------------------ the tuning rule


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
