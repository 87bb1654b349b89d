"""Resident memory of L1RA with frequent reallocations against LoRA, on the sentiment task (MiniLM), with and without
bf16 autocast. Each configuration runs in its own process; prints RSS every 10 steps and the peak.

    python benchmarks/realloc_memory.py --steps 60
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/realloc_memory.py

L1RA here uses a strong L1 (lambda 2, eta_c 0.1, a reallocation every 5 steps) so that ranks move at every
reallocation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def one(method: str, autocast: bool, steps: int) -> dict:
    import torch

    from l1ra.app import peak_rss_mb, rss_mb
    from l1ra.app.compare import Precision, RunSpec, build_task, lr_lambda, train_step, wrap_model

    torch.set_num_threads(1)
    task = build_task("sentiment", 64, 50)
    torch.manual_seed(0)
    base = task.load_model()
    torch.manual_seed(0)
    spec = RunSpec(task="sentiment", method=method, seed=0, steps=steps, batch_size=16, lr=1e-3, max_length=64,
                   l1ra_lambda=2.0, eta_c=0.1, update_every=5, l1_start=0)
    pm, opt, after_step = wrap_model(method, base, task, spec)
    pm.train()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, spec.warmup_ratio))
    rss = []
    for step, batch in enumerate(task.train_batches(0, steps, 16), 1):
        train_step(pm, opt, sched, after_step, batch, step, spec.max_grad_norm,
                   Precision("cpu", torch.bfloat16 if autocast else None))
        if step % 10 == 0:
            rss.append(round(rss_mb()))
            # A partial line every 10 steps, so a run cut short by a time limit still reports (the last line counts).
            print(json.dumps({"method": method, "autocast": autocast, "steps_done": step, "rss_every_10_steps_mib": rss,
                              "peak_rss_mib": round(peak_rss_mb())}), flush=True)
    moved = sum(sum(e.added.values()) for e in pm.l1ra_state.history.events) if method == "l1ra" else 0
    return {"method": method, "autocast": autocast, "rss_every_10_steps_mib": rss, "ranks_moved": moved,
            "peak_rss_mib": round(peak_rss_mb())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--one", nargs=2, metavar=("METHOD", "AUTOCAST"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1] == "1", args.steps)))
        return
    for autocast in ("0", "1"):
        for method in ("lora", "l1ra"):
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--one", method, autocast],
                                 capture_output=True, text=True, check=True).stdout
            print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
