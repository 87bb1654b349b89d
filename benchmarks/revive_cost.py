"""Cost of `new_rank_init="gradient"` over a whole reallocation interval, against PEFT LoRA in the same run.

    python benchmarks/revive_cost.py --models smollm2 --interval 15 --intervals 2

LoRA, L1RA with random new ranks and L1RA with gradient new ranks train on the same batch, one step each in turn
(the order rotates every step). L1RA reallocates every `--interval` optimizer steps (15: a 150-step run at the
default update_every=0.1) with a strong L1 so that ranks do move; the gradient variant sketches the weight gradient
during the step before each reallocation. Each step's time includes `after_optimizer_step` (and so the
reallocations). The ratio is the mean step time over whole intervals (the periodic costs included), L1RA / LoRA.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (load, step)


def build(method: str, model, lora_kwargs: dict, interval: int, total: int):
    import peft

    import l1ra

    torch.manual_seed(0)
    if method == "lora":
        m = peft.get_peft_model(model, peft.LoraConfig(lora_dropout=0.0, **lora_kwargs))
        return m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4), lambda: None
    init = "gradient" if method == "l1ra_gradient" else "random"
    cfg = l1ra.L1RAConfig(lora_dropout=0.0, update_every=interval, total_steps=total, l1ra_lambda=1.0, eta_c=0.5,
                          new_rank_init=init, **lora_kwargs)
    m = l1ra.get_l1ra_model(model, cfg)
    opt = l1ra.create_optimizer(m, lr=1e-4)
    return m, opt, lambda: l1ra.after_optimizer_step(m, opt)


def bench(name: str, interval: int, intervals: int, device) -> dict:
    import l1ra

    base, batch, lora_kwargs = overhead.load(name, device)
    steps = interval * intervals
    methods = ("lora", "l1ra_random", "l1ra_gradient")
    runs = {m: build(m, copy.deepcopy(base), lora_kwargs, interval, steps + 1) for m in methods}
    for m in methods:  # warm-up outside the timed window (does not reach a reallocation step)
        overhead.step(*runs[m], batch, device, False)
    times = {m: [] for m in methods}
    for i in range(steps - 1):
        order = methods[i % 3:] + methods[: i % 3]
        for m in order:
            times[m].append(overhead.timed(lambda: overhead.step(*runs[m], batch, device, False)))
    mean = {m: statistics.fmean(t) for m, t in times.items()}
    moved = {m: sum(e.moved for e in l1ra.rank_history(runs[m][0]).events) for m in methods if m != "lora"}
    return {
        "model": name, "interval": interval, "timed_steps": steps - 1,
        "mean_step_s": mean,
        "median_step_s": {m: statistics.median(t) for m, t in times.items()},
        "ratio_random": mean["l1ra_random"] / mean["lora"],
        "ratio_gradient": mean["l1ra_gradient"] / mean["lora"],
        "gradient_over_random": mean["l1ra_gradient"] / mean["l1ra_random"],
        "ranks_moved": moved,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2"], choices=["minilm", "smollm2"])
    parser.add_argument("--interval", type=int, default=15)
    parser.add_argument("--intervals", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = []
    for name in args.models:
        r = bench(name, args.interval, args.intervals, device)
        out.append(r)
        print(f"{name}: step time / LoRA over {r['timed_steps']} steps (mean, reallocation every {r['interval']}): "
              f"random {r['ratio_random']:.3f}x, gradient {r['ratio_gradient']:.3f}x "
              f"(gradient / random {r['gradient_over_random']:.3f}x); ranks moved {r['ranks_moved']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "threads": args.threads, "results": out},
                                              indent=1))


if __name__ == "__main__":
    main()
