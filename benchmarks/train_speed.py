"""Speed and memory of the `l1ra train` recipe on the default run's data (SmolLM2-135M-Instruct, GSM8K, 192 tokens).

Variants, each a fresh process (so peak RSS and page faults are its own), run interleaved in rounds:

- `today`:  L1RA, padded batches, full-vocabulary logits (the model's own loss) — the recipe before this change;
- `l1ra`:   L1RA, the new batching and loss (padding-free batches where the model supports them, LM head on loss
            positions only);
- `lora`:   plain PEFT LoRA (same rank, alpha, targets, lr, data, batches), the same batching and loss as `l1ra`;
- `-malloc` suffix: the same with glibc's malloc told to keep freed memory (`l1ra.app.train.memory.keep_freed_memory`, as
  `l1ra train` does on a CPU run): the kernel-time / page-fault question of `make run`. `l1ra-malloc` is the recipe
  of `l1ra train` on a CPU now, `lora-malloc` plain LoRA with the same recipe.

Every variant trains through `l1ra.app.train.trainers.build_trainer` (the Trainer the CLI uses) on the same batches; the step
time is measured from the Trainer's `on_step_begin` to `on_step_end` (forward, backward, optimizer, L1RA callback),
the first step is a warm-up. Reported: median step time, useful (loss-carrying) tokens per second, peak RSS, minor page
faults and user/system CPU time per step, and the ratios against `today` and `lora`. On a shared machine the CPU
time per step (user + system) is steadier than the wall time.

    PYTHONPATH=src nice -n 10 python benchmarks/train_speed.py              # ~4 min on 2 shared CPU cores
    PYTHONPATH=src python benchmarks/train_speed.py --rounds 3 --steps 8    # steadier figures
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

VARIANTS = ("today", "l1ra-malloc", "lora-malloc", "l1ra")


def worker(variant: str, steps: int, batch_size: int, max_length: int, bf16: Optional[bool], layers: int) -> dict:
    malloc = variant.endswith("-malloc")
    variant = variant.removesuffix("-malloc")
    if malloc:
        from l1ra.app.train.memory import keep_freed_memory

        assert keep_freed_memory(), "glibc's mallopt is not available here"
    import resource
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    import l1ra
    from l1ra.app.train import data, shipped_data
    from l1ra.app.assets import smollm2_dir
    from l1ra.app.devices import current_plan
    from l1ra.app.train.trainers import build_trainer

    torch.manual_seed(0)
    path = str(smollm2_dir())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if layers:  # a shallower model for slow machines: same vocabulary and head, fewer decoder blocks
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    train, held = shipped_data.gsm8k_split()
    fmt = data.Format("prompt-completion", prompt="prompt", completion="completion")
    rows, _ = data.sft_rows(tok, train[: batch_size * (steps + 1)], fmt, max_length)
    total = steps + 1
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                                 task_type="CAUSAL_LM"))
        # the same optimizer class as l1ra.create_optimizer (the Trainer's default, fused AdamW, differs on a CPU)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
        callbacks = []
    else:
        model = l1ra.get_l1ra_model(model, l1ra.L1RAConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                           lora_dropout=0.0, task_type="CAUSAL_LM", l1ra_lambda=0.5,
                                                           eta_c=0.1, update_every=8))
        # update_every=8 as in the default run (0.1 x 80 steps): the timed steps hold no reallocation, whose cost
        # is amortised over 8 steps and measured by benchmarks/overhead.py
        optimizer, callbacks = l1ra.create_optimizer(model, lr=2e-4), [l1ra.L1RACallback()]

    times, useful = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    plan = current_plan(bf16=bf16, cpu_bf16_default=True)  # the CLI's default for the shipped LLM
    with tempfile.TemporaryDirectory() as out:
        args = dict(output_dir=out, max_steps=total, per_device_train_batch_size=batch_size, learning_rate=2e-4,
                    lr_scheduler_type="constant", logging_steps=1, save_strategy="no", eval_strategy="no",
                    report_to="none", disable_tqdm=True, remove_unused_columns=False, seed=0, data_seed=0,
                    **plan.training_arguments())
        old = variant == "today"
        trainer = build_trainer("causal-lm", model, tok, rows, rows[:1], args, optimizer, callbacks + [Clock()],
                                max_length, padding_free=False if old else None, sparse_head=False if old else None)
        for batch in trainer.get_train_dataloader():
            useful.append(int((batch["labels"][:, 1:] != -100).sum()))
        before = resource.getrusage(resource.RUSAGE_SELF)
        trainer.train()
        after = resource.getrusage(resource.RUSAGE_SELF)
    step_s = statistics.median(times[1:])
    return {
        "variant": variant, "device": plan.describe(), "padding_free": trainer.data_collator.padding_free,
        "sparse_head": trainer.sparse_head, "step_s": step_s, "useful_tokens_per_step": statistics.mean(useful),
        "useful_tokens_per_s": statistics.mean(useful) / step_s,
        "peak_rss_mb": after.ru_maxrss / 1024, "minor_faults_per_step": (after.ru_minflt - before.ru_minflt) / total,
        "sys_s_per_step": (after.ru_stime - before.ru_stime) / total,
        "user_s_per_step": (after.ru_utime - before.ru_utime) / total,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                    help="mixed precision: the CLI's default (auto), or forced on/off")
    ap.add_argument("--layers", type=int, default=0, help="keep only the first N decoder blocks (0: all 30)")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        bf16 = {"auto": None, "on": True, "off": False}[a.bf16]
        print(json.dumps(worker(a.worker, a.steps, a.batch_size, a.max_length, bf16, a.layers)))
        return
    variants = [v for v in a.variants.split(",") if v]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(a.rounds):
        for v in variants:  # interleaved: machine load drifts evenly over the variants
            cmd = [sys.executable, __file__, "--worker", v, "--steps", str(a.steps),
                   "--batch-size", str(a.batch_size), "--max-length", str(a.max_length), "--bf16", a.bf16,
                   "--layers", str(a.layers)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{v} failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            res["variant"] = v
            results[v].append(res)
            print(f"round {r + 1} {v:12s} step {res['step_s']:.2f}s  {res['useful_tokens_per_s']:.0f} useful tok/s  "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB  {res['minor_faults_per_step']:.0f} minor faults/step  "
                  f"sys {res['sys_s_per_step']:.2f}s/step", file=sys.stderr, flush=True)
    med = {v: {k: statistics.median(x[k] for x in rs) for k in ("step_s", "useful_tokens_per_step", "peak_rss_mb",
                                                                  "minor_faults_per_step", "sys_s_per_step",
                                                                  "user_s_per_step")}
           for v, rs in results.items()}
    for m in med.values():  # tokens per second at the median step time (a median of ratios would not invert)
        m["useful_tokens_per_s"] = m["useful_tokens_per_step"] / m["step_s"]
    first = next(iter(results.values()))[0]
    print(f"device {first['device']}; {a.layers or 30} decoder blocks; batch {a.batch_size} x {a.max_length} tokens; {a.steps} timed steps x "
          f"{a.rounds} rounds per variant; medians")
    print(f"{'variant':12s} {'step s':>7s} {'useful tok/s':>12s} {'peak RSS MB':>11s} {'minflt/step':>11s} "
          f"{'sys s/step':>10s} {'user s/step':>11s}")
    for v, m in med.items():
        print(f"{v:12s} {m['step_s']:7.2f} {m['useful_tokens_per_s']:12.0f} {m['peak_rss_mb']:11.0f} "
              f"{m['minor_faults_per_step']:11.0f} {m['sys_s_per_step']:10.2f} {m['user_s_per_step']:11.2f}")
    for num, den in (("l1ra", "today"), ("l1ra-malloc", "today"), ("l1ra", "lora"), ("l1ra-malloc", "lora-malloc"),
                     ("l1ra-malloc", "l1ra"), ("lora-malloc", "lora")):
        if num in med and den in med:
            n, d = med[num], med[den]
            print(f"{num} / {den}: step time {n['step_s'] / d['step_s']:.3f}, useful tokens/s "
                  f"{n['useful_tokens_per_s'] / d['useful_tokens_per_s']:.3f}, peak RSS {n['peak_rss_mb'] / d['peak_rss_mb']:.3f}, "
                  f"CPU time {(n['user_s_per_step'] + n['sys_s_per_step']) / (d['user_s_per_step'] + d['sys_s_per_step']):.3f}, "
                  f"minor faults {n['minor_faults_per_step'] / max(d['minor_faults_per_step'], 1):.3f}, "
                  f"system time {n['sys_s_per_step'] / max(d['sys_s_per_step'], 1e-9):.3f}")
    if a.json:
        a.json.write_text(json.dumps({"args": vars(a), "runs": results, "medians": med}, indent=1, default=str))


if __name__ == "__main__":
    main()
