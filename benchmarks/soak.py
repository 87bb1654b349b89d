"""Soak test: many optimizer steps with frequent reallocations; memory must stay flat and the rank budget must hold.

    python benchmarks/soak.py --steps 2000 --every 20

Trains a small randomly initialised Llama (4 layers, hidden 64, all-linear L1RA at r=8) with the plain-loop API, a
reallocation every `--every` optimizer steps and an L1 strength that makes ranks move at almost every reallocation.
Prints resident memory (RSS) after warm-up (the first reallocation) and at the end, its growth, whether the total rank
equalled the budget after every step, and how many ranks moved. Exit status 1 if growth >= the target or the budget
broke.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=20, help="optimizer steps between reallocations")
    parser.add_argument("--target", type=float, default=5.0, help="max RSS growth in percent")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import l1ra

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    ))
    cfg = l1ra.L1RAConfig(
        r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM",
        l1ra_lambda=1.0, eta_c=0.05, update_every=args.every, total_steps=args.steps, seed=0,
    )
    model = l1ra.get_l1ra_model(base, cfg)
    model.train()
    optimizer = l1ra.create_optimizer(model, lr=5e-3, weight_decay=0.01)
    budget = model.l1ra_state.budget
    gen = torch.Generator().manual_seed(0)

    budget_held, rss_start, t0 = True, None, time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = torch.randint(0, 256, (4, 32), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        l1ra.after_optimizer_step(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        if sum(l1ra.rank_pattern(model).values()) != budget:
            budget_held = False
            print(f"budget broken at step {step}: {sum(l1ra.rank_pattern(model).values())} != {budget}", file=sys.stderr)
        if step == args.every:  # warm-up done: allocator caches, optimizer state and the first reallocation exist
            gc.collect()
            rss_start = rss_mib()
    gc.collect()
    rss_end = rss_mib()
    history = l1ra.rank_history(model)
    growth = 100.0 * (rss_end - rss_start) / rss_start
    figures = {
        "steps": args.steps,
        "reallocation_every": args.every,
        "reallocations": model.l1ra_state.reallocations,
        "ranks_moved_total": history.total_moved,
        "reallocations_that_moved_ranks": sum(1 for e in history.events if e.moved),
        "budget": budget,
        "budget_held_every_step": budget_held,
        "rss_start_mib": round(rss_start, 1),
        "rss_end_mib": round(rss_end, 1),
        "rss_growth_percent": round(growth, 2),
        "seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }
    for k, v in figures.items():
        print(f"{k:32s} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0 if budget_held and growth < args.target else 1


if __name__ == "__main__":
    sys.exit(main())
