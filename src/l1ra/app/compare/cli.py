"""`l1ra compare`'s command line: the flags, their checks, and the command (light: no torch at import)."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..errors import UserError
from .dataset import MAX_DEV, MAX_TEST, MIN_ROWS, MIN_SPLIT
from .methods import METHODS
from .plan import make_plan
from .runner import run_compare, write_reports
from .tasks import BUILTIN_TASKS


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


def _add_what(p: argparse.ArgumentParser) -> None:
    what = p.add_argument_group("what to compare (one of --task or --dataset)")
    what.add_argument("--task", choices=BUILTIN_TASKS, default=None,
                      help="sentiment: MiniLM on Rotten Tomatoes, SST-2 accuracy; gsm8k: SmolLM2-135M-Instruct, "
                           "held-out answer loss; tiny: a random tiny model (seconds, for smoke tests)")
    what.add_argument("--dataset", metavar="FILE", default=None,
                      help="your data: a .json, .jsonl, .csv or .parquet file in the formats and columns of l1ra "
                           f"train --dataset. Carved by fixed seeded shuffles into a test split (10%% of the rows, "
                           f"{MIN_SPLIT} to {MAX_TEST}), a dev split for --tune (10%%, {MIN_SPLIT} to {MAX_DEV}; "
                           f"--dev-size) and the training rows (at least {MIN_ROWS} rows in all); scored by the "
                           "held-out answer-token loss")
    what.add_argument("--model", default=None,
                      help="with --dataset: a causal LM folder or hub id (default: the shipped SmolLM2-135M-Instruct)")
    for name, text in (("prompt", "the prompt (with --completion-column)"), ("completion", "the completion"),
                       ("messages", "chat messages"), ("text", "plain text")):
        what.add_argument(f"--{name}-column", default=None, help=f"with --dataset: the column with {text} (default: "
                          "found by name, as in l1ra train)")
    what.add_argument("--output-dir", type=Path, default=None, help="where results.json/.md and the PNG go "
                      "(default: compare-<task or file name>); runs already in its results.json (same spec) are not "
                      "run again")
    what.add_argument("--methods", type=parse_methods, default=None,
                      help=f"comma list from {', '.join(METHODS)} (default: all but dora; head_only on sentiment only)")
    what.add_argument("--dora", action="store_true", help="also run DoRA (PEFT)")
    what.add_argument("--seeds", type=parse_seeds, default=None, help="a count (3 -> seeds 0,1,2) or a list "
                      "(0,5,7); default 5 for sentiment, 3 otherwise (1 with --quick)")
    what.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: per task)")
    what.add_argument("--quick", action="store_true", help="short smoke run: 1 seed, few steps")


def _add_tuning(p: argparse.ArgumentParser) -> None:
    tuning = p.add_argument_group("tuning on the dev split")
    tuning.add_argument("--tune", action="store_true",
                        help="first run a learning-rate grid per method on the dev split and use each method's best")
    tuning.add_argument("--lr-grid", type=parse_lrs, default=None, help="--tune's learning rates, e.g. "
                        "3e-4,1e-3,3e-3 (default: per task, at least 3)")
    tuning.add_argument("--tune-extend", type=int, default=2,
                        help="--tune: while a method's best lr is at an edge of what it tried, try one grid step "
                        "beyond, up to this many times per method (default 2; 0: the grid only)")
    tuning.add_argument("--tune-seeds", type=int, default=1,
                        help="--tune: how many of the seeds (the first) tune (default 1)")
    tuning.add_argument("--dev-only", action="store_true",
                        help="--tune only: stop after the dev-split runs, score nothing on the reported split (decide "
                        "settings on dev first)")
    tuning.add_argument("--dev-seeds", type=int, default=0,
                        help="--tune: then run every row at its best lr on the dev split for this many seeds (the "
                        "first; tuning runs are reused) and report that table: the dev comparison that decides a "
                        "setting before the reported split is scored")
    tuning.add_argument("--dev-size", type=int, default=None,
                        help="examples carved from the training data as the dev split (seeded; default per task)")


def _add_training(p: argparse.ArgumentParser) -> None:
    train = p.add_argument_group("training (the same for every row)")
    train.add_argument("--jobs", type=int, default=1, help="runs side by side, each in its own process (default 1)")
    train.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--lr", type=float, default=None, help="adapter learning rate of every method without --tune")
    train.add_argument("--max-length", type=int, default=None, help="tokens per example")
    train.add_argument("--eval-limit", type=int, default=None, help="score on the first N evaluation examples only")
    train.add_argument("--rank", type=int, default=8, help="rank budget per targeted module (AdaLoRA's target_r)")
    train.add_argument("--lora-alpha", type=int, default=None, help="default: 2 x rank")
    train.add_argument("--lora-dropout", type=float, default=0.05)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--warmup-ratio", type=float, default=0.1)
    train.add_argument("--max-grad-norm", type=float, default=1.0)
    train.add_argument("--threads", type=int, default=1,
                       help="torch threads per run (default 1: on a shared machine, more threads make step times "
                            "erratic because OpenMP threads wait for each other; use the core count on a quiet "
                            "machine)")


def _add_rows(p: argparse.ArgumentParser) -> None:
    rows = p.add_argument_group("row settings")
    rows.add_argument("--l1ra-lambda", type=float, default=None,
                      help="l1ra_tuned (and its variants): L1 strength (default 0.1, as the library's, used by "
                           "the l1ra row)")
    rows.add_argument("--eta-c", type=float, default=None, help="l1ra_tuned: gate learning rate (default 0.1; the "
                      "library's is 2e-2)")
    rows.add_argument("--update-every", type=float, default=None,
                      help="every L1RA row: reallocation interval, a fraction of the steps (<1) or a whole number of "
                           "steps (default: L1RAConfig's)")
    rows.add_argument("--l1-start", type=float, default=None,
                      help="l1ra_tuned: start the L1 penalty after this fraction of the steps (<1) or this whole "
                      "number of steps (default 0.25; the library's is 0, the paper's method)")
    rows.add_argument("--prune-threshold", type=float, default=None,
                      help="L1RA prune threshold (default: L1RAConfig's)")
    rows.add_argument("--adalora-delta-t", type=int, default=None, help="adalora_paper: deltaT (default 10)")


def _add_measuring(p: argparse.ArgumentParser) -> None:
    measure = p.add_argument_group("measuring and reporting")
    measure.add_argument("--timing-steps", type=int, default=None,
                         help="steps of the interleaved step-time measurement (all methods in one process, one step "
                              "each in turn; the step-time ratios come from it); 0 skips it (default: 20, 3 with "
                              "--quick)")
    measure.add_argument("--from-results", type=Path, default=None, metavar="RESULTS_JSON",
                         help="run nothing: rewrite results.md and the figures from the runs in this results.json "
                              "(e.g. of an interrupted comparison) into --output-dir")
    measure.add_argument("--in-process", action="store_true",
                         help="run everything in this process (faster start; peak-memory figures are then not per "
                              "method)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every flag of `l1ra compare`."""
    _add_what(p)
    _add_tuning(p)
    _add_training(p)
    _add_rows(p)
    _add_measuring(p)


DESCRIPTION = ("L1RA against LoRA, AdaLoRA and ablations, at the same rank budget, data order, steps, schedule and "
               "seeds, on a built-in task (--task) or on your own data (--dataset FILE, --model)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `l1ra compare` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "compare",
        help="L1RA vs LoRA, AdaLoRA and ablations on a built-in task or your data: same budget, data, steps, seeds; "
             "tuned on a dev split",
        description=DESCRIPTION, usage="%(prog)s [options]",  # --help lists the options
    )
    add_arguments(p)
    p.set_defaults(func=run_from_args)
    return p


def _output_dir(args) -> Path:
    if args.output_dir:
        return Path(args.output_dir)
    return Path(f"compare-{Path(args.dataset).stem if args.dataset else args.task or 'results'}")


def run_from_args(args, argv: Optional[Sequence[str]] = None) -> int:
    output_dir = _output_dir(args)
    if args.from_results:
        # Re-render the reports from the runs already in a results.json (e.g. an interrupted comparison).
        results = json.loads(Path(args.from_results).read_text())
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        results.setdefault("failures", [])
        write_reports(results, output_dir)
        print((Path(output_dir) / "results.md").read_text())
        return 0
    plan = make_plan(args)
    from .loop import resolve_device  # torch: only once a comparison runs

    resolve_device(plan.common["device"])  # a device this machine lacks is named before any run
    command = "l1ra compare " + shlex.join(list(argv) if argv is not None else _compare_argv())
    what = f"{args.dataset} ({plan.common['user_data']['rows']} rows)" if args.dataset else f"task {args.task}"
    print(f"l1ra compare: {what}, {len(plan.methods)} methods x {len(plan.seeds)} seeds, "
          f"{plan.common['steps']} steps each"
          + (f", after tuning {len(plan.lr_grid)} learning rates on the dev split" if plan.lr_grid else "")
          + f" -> {output_dir}", flush=True)
    timing_steps = args.timing_steps if args.timing_steps is not None else (3 if args.quick else 20)
    results = run_compare(plan, output_dir, isolate=not args.in_process, command=command,
                          log=lambda msg: print(msg, flush=True), timing_steps=timing_steps, jobs=args.jobs,
                          dev_only=args.dev_only)
    print((Path(output_dir) / "results.md").read_text())
    return 1 if results["failures"] else 0


def _compare_argv() -> list[str]:
    argv = sys.argv[1:]
    return argv[argv.index("compare") + 1 :] if "compare" in argv else argv


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m l1ra.app.compare ...` (the same as `l1ra compare ...`)."""
    parser = argparse.ArgumentParser(prog="l1ra compare", description=DESCRIPTION, usage="%(prog)s [options]")
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args, argv)
    except (UserError, ValueError) as exc:
        parser.error(str(exc))
