"""Sweep L1RA's own hyperparameters on an `l1ra compare` task, against plain LoRA on the same batches and seeds.

Each configuration is `lambda,eta_c,l1_start[,receiver_signal]` (l1_start: a fraction of the steps, or a step count
>= 1; receiver_signal: `min_gate`, the default, or `sensitivity`). Every run is
scored on the dev split carved from the training data (never the reported split: the setting chosen here is what
`l1ra compare` then reports as l1ra_tuned). Runs go one after another in this process (scores only; `l1ra compare`
measures time and memory per process):

    python benchmarks/l1ra_sweep.py --task sentiment --steps 200 --seeds 0,1,2 \\
        --configs 0.1,2e-2,0 0.3,0.1,0.25 --json benchmarks/results/sweep_sentiment.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import dataclasses

from l1ra.app.compare import add_arguments, build_task, make_plan, run_one


def parse_config(text: str) -> dict:
    lam, eta_c, start, *signal = text.split(",")
    cfg = {"l1ra_lambda": float(lam), "eta_c": float(eta_c), "l1_start": float(start)}
    if signal:  # the receivers' order (L1RAConfig.receiver_signal): min_gate (default) or sensitivity
        cfg["receiver_signal"] = signal[0]
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)  # every `l1ra compare` flag (task, steps, seeds, lr, ...)
    p.add_argument("--configs", nargs="+", type=parse_config, required=True, metavar="LAMBDA,ETA_C,L1_START[,SIGNAL]")
    p.add_argument("--no-lora", action="store_true", help="skip the LoRA baseline")
    p.add_argument(
        "--new-rank-v", choices=["mean", "zero"], default="mean",
        help="Adam moments of revived slots: 'mean' keeps the library's seeding (from the slot's first gradient; the "
        "name is historical) or 'zero' (no seeding: zero moments under a mature bias correction; an ablation)",
    )
    p.add_argument("--json", type=Path, default=None, help="write every run here (rewritten after each run)")
    args = p.parse_args(argv)
    args.methods = ["lora", "l1ra_tuned"]
    if args.new_rank_v == "zero":  # the ablation: revived slots keep the zero moments of the reset
        import l1ra.optim

        l1ra.optim.seed_slots_ = lambda *args, **kwargs: []
    specs = [dataclasses.replace(s, split="dev") for s in make_plan(args).final_specs({})]
    if specs[0].dev_size <= 0:
        p.error("--dev-size must be > 0: the sweep scores on the dev split")
    base_specs = [s for s in specs if s.method == "l1ra_tuned"]
    lora_specs = [] if args.no_lora else [s for s in specs if s.method == "lora"]
    first = (lora_specs or base_specs)[0]
    task = build_task(first.task, first.max_length, first.eval_limit, first.dev_size)
    runs = []

    def record(spec, label):
        t0 = time.time()
        r = run_one(spec, task)
        l1 = r.get("l1ra", {})
        runs.append({"config": label, "seed": spec.seed, "split": r["split"], "score": r["score"], "ranks_moved": l1.get("ranks_added", 0),
                     "ranks_pruned": l1.get("ranks_pruned", 0), "wall_s": time.time() - t0,
                     "spec_hash": r["spec_hash"], "train_losses": r["train_losses"]})  # losses: paired per-step checks
        print(f"{label:>22} seed {spec.seed}: {task.score_name} {r['score']:.4f}, "
              f"ranks moved {runs[-1]['ranks_moved']}, pruned {runs[-1]['ranks_pruned']} "
              f"({runs[-1]['wall_s']:.0f} s)", flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"argv": sys.argv[1:], "runs": runs}, indent=1))

    for spec in lora_specs:
        record(spec, "lora")
    for cfg in args.configs:
        label = f"l1ra {cfg['l1ra_lambda']:g},{cfg['eta_c']:g},{cfg['l1_start']:g}"
        label += f",{cfg['receiver_signal']}" if "receiver_signal" in cfg else ""
        label += ",zero-v" if args.new_rank_v == "zero" else ""
        if cfg["l1_start"] >= 1:
            cfg["l1_start"] = int(cfg["l1_start"])
        for spec in base_specs:
            for k, v in cfg.items():
                setattr(spec, k, v)
            record(spec, label)
    print(f"\nconfig: mean {task.score_name} on the dev split (std) over seeds, mean ranks moved")
    for label in dict.fromkeys(r["config"] for r in runs):
        scores = [r["score"] for r in runs if r["config"] == label]
        moved = [r["ranks_moved"] for r in runs if r["config"] == label]
        std = statistics.stdev(scores) if len(scores) > 1 else 0.0
        print(f"{label:>22}: {statistics.mean(scores):.4f} ({std:.4f}), {statistics.mean(moved):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
