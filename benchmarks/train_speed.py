"""Which batch layout, attention kernel and allocator setting make `l1ra train` fastest on THIS machine, and how the
recipe compares with a plain PEFT LoRA + `Trainer` on the default job (SmolLM2-135M-Instruct, all 30 blocks, GSM8K).

Every variant is a fresh process (its own peak RSS) on the whole default model; variants run interleaved in rounds
so that load drifting over the run hits them all alike. A variant is `LAYOUT-ATTENTION[+keep]`:

- LAYOUT `padded` (one row per example, padded to the batch's longest), `grouped` (padded, batches drawn from
  examples of similar length: the Trainer's `group_by_length`), `packed` (padding-free: one row of concatenated
  examples with `position_ids`), or `naive`: plain PEFT LoRA (same rank, alpha, targets, lr, data) with
  `transformers.Trainer`, padded batches, the model's own loss on full logits, the Trainer's default optimizer;
- ATTENTION: the model's `attn_implementation` (`sdpa`, `eager`, `flash_attention_2` where installed);
- `+keep`: glibc told to keep freed memory (`l1ra.app.memory.keep_freed_memory`).

Per variant: start-up (imports, model load, wrap, Trainer and data), median step time and tokens/s (non-padding
tokens; "useful" ones carry loss), one held-out evaluation pass and a forward-only pass over the same batches (the
evaluation's share of forward speed), and peak RSS. The machine's kind (device, native bf16, cores) and a matmul's
FLOP/s on it give the model FLOPs utilisation, 6 x parameters x tokens/s over that peak.

    PYTHONPATH=src python benchmarks/train_speed.py                  # the candidates for this machine, 2 rounds
    PYTHONPATH=src python benchmarks/train_speed.py --variants padded-sdpa,naive-sdpa --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_JOB = dict(r=8, lora_alpha=16, lr=2e-4)  # the default run's adapter and learning rate


def machine_kind() -> dict:
    import torch

    from l1ra.app import cpu_bf16_native, current_plan

    plan = current_plan()
    kind = {"device": plan.device, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_bf16_native": cpu_bf16_native(), "precision": plan.describe()}
    if plan.device == "cuda":
        kind["gpu"] = torch.cuda.get_device_name()
    return kind


def matmul_flops(dtype_name: str, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n matmul in `dtype_name` on the plan's device: the machine's practical peak."""
    import torch

    from l1ra.app import current_plan

    device = current_plan().device
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype_name))
    b = torch.randn(n, n, device=device, dtype=a.dtype)
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times[1:])


def parse_variant(variant: str) -> tuple[str, str, bool]:
    name, keep = variant.removesuffix("+keep"), variant.endswith("+keep")
    layout, _, attn = name.partition("-")
    if layout not in ("padded", "grouped", "packed", "naive") or not attn:
        raise SystemExit(f"unknown variant {variant!r}: LAYOUT-ATTENTION[+keep], LAYOUT one of padded, grouped, "
                         "packed, naive")
    return layout, attn, keep


def worker(variant: str, steps: int, batch_size: int, max_length: int, n_eval: int) -> dict:
    t_start = time.perf_counter()
    layout, attn, keep = parse_variant(variant)
    if keep:
        from l1ra.app import keep_freed_memory

        assert keep_freed_memory(), "glibc's mallopt is not available here"
    import tempfile

    import torch

    from l1ra.app import current_plan, peak_rss_mb, smollm2_dir
    from l1ra.app.train import Format, gsm8k_split, load_model, load_tokenizer

    torch.manual_seed(0)
    plan = current_plan(cpu_bf16_default=True)
    path = str(smollm2_dir())
    tok = load_tokenizer(path)
    model = load_model(path, "causal-lm", load_in_4bit=False, plan=plan, attn_implementation=attn)
    n_params = sum(p.numel() for p in model.parameters())
    train, held = gsm8k_split()
    fmt = Format("prompt-completion", prompt="prompt", completion="completion")
    total = steps + 1
    with tempfile.TemporaryDirectory() as out:
        args = dict(output_dir=out, max_steps=total, per_device_train_batch_size=batch_size,
                    per_device_eval_batch_size=max(batch_size, 16), learning_rate=DEFAULT_JOB["lr"],
                    lr_scheduler_type="constant", logging_steps=1, save_strategy="no", eval_strategy="no",
                    report_to="none", disable_tqdm=True, seed=0, data_seed=0, **plan.training_arguments())
        if layout == "naive":
            trainer = naive_trainer(model, tok, train[: batch_size * total * 4], held[:n_eval], fmt, max_length,
                                    args)
        else:
            trainer = recipe_trainer(model, tok, train[: batch_size * total * 4], held[:n_eval], fmt, max_length,
                                     args, layout)
        startup = time.perf_counter() - t_start
        times: list[float] = []
        cpu: list[float] = []
        trainer.add_callback(step_clock(times, cpu))
        batches = list(trainer.get_train_dataloader())[:total]
        tokens = [count_tokens(b) for b in batches]
        useful = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
        trainer.train()
        ev = eval_speed(trainer, model)
        peak = peak_rss_mb()
    step_s = statistics.median(times[1:])
    return {"variant": variant, "device": plan.describe(), "params": n_params, "startup_s": startup, "step_s": step_s,
            "cpu_s_per_step": statistics.median(cpu[1:]),
            "tokens_per_s": statistics.mean(tokens[1:]) / step_s, "useful_tokens_per_s": statistics.mean(useful[1:]) / step_s,
            "padding_share": 1 - sum(tokens) / sum(b["input_ids"].numel() for b in batches),
            "peak_rss_mb": peak, **ev}


def recipe_trainer(model, tok, train_rows, held_rows, fmt, max_length, args, layout):
    import l1ra
    from l1ra.app.train import build_trainer, sft_rows

    rows, _ = sft_rows(tok, train_rows, fmt, max_length)
    held, _ = sft_rows(tok, held_rows, fmt, max_length)
    model = l1ra.get_l1ra_model(model, l1ra.L1RAConfig(
        r=DEFAULT_JOB["r"], lora_alpha=DEFAULT_JOB["lora_alpha"], target_modules="all-linear", lora_dropout=0.0,
        task_type="CAUSAL_LM", update_every=1000))  # no reallocation in the timed steps (benchmarks/overhead.py)
    if layout == "grouped":
        args = dict(args, train_sampling_strategy="group_by_length")  # the Trainer's length-grouped sampler
    return build_trainer("causal-lm", model, tok, rows, held, dict(args, remove_unused_columns=False),
                         l1ra.create_optimizer(model, lr=DEFAULT_JOB["lr"]), [l1ra.L1RACallback()], max_length,
                         padding_free=layout == "packed")


def naive_trainer(model, tok, train_rows, held_rows, fmt, max_length, args):
    """What a user writes from PEFT's and transformers' docs: LoRA on all linear layers, tokenised prompt/completion
    pairs with the prompt masked, padded batches, the model's own loss, the Trainer's defaults."""
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from l1ra.app.train import tokenize_rows

    model = get_peft_model(model, LoraConfig(r=DEFAULT_JOB["r"], lora_alpha=DEFAULT_JOB["lora_alpha"],
                                             target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"))
    rows, _ = tokenize_rows(tok, train_rows, fmt, max_length)
    held, _ = tokenize_rows(tok, held_rows, fmt, max_length)
    return Trainer(model=model, args=TrainingArguments(**args, prediction_loss_only=True),
                   train_dataset=datasets.Dataset.from_list(rows), eval_dataset=datasets.Dataset.from_list(held),
                   data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))


def count_tokens(batch) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def step_clock(times: list, cpu: list):
    """Wall and CPU seconds (user + system, all threads) of each optimizer step; on a shared machine the CPU time is
    the steadier figure."""
    import resource

    from transformers import TrainerCallback

    def cpu_now() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), cpu_now()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
            cpu.append(cpu_now() - self.c0)

    return Clock()


def eval_speed(trainer, model) -> dict:
    """One `trainer.evaluate()` pass, and a forward-only pass (no loss, no gathering) over the same batches."""
    import torch

    batches = list(trainer.get_eval_dataloader())
    tokens = sum(count_tokens(b) for b in batches)
    t0 = time.perf_counter()
    trainer.evaluate()
    eval_s = time.perf_counter() - t0
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad(), trainer.autocast_smart_context_manager():
        for batch in batches:
            feed = {k: v.to(trainer.args.device) for k, v in batch.items()
                    if k in ("input_ids", "attention_mask", "position_ids")}
            model(**feed, use_cache=False)
    forward_s = time.perf_counter() - t0
    return {"eval_s": eval_s, "eval_tokens": tokens, "eval_tokens_per_s": tokens / eval_s,
            "forward_tokens_per_s": tokens / forward_s, "eval_vs_forward": forward_s / eval_s}


SUMMED = ("startup_s", "step_s", "cpu_s_per_step", "tokens_per_s", "useful_tokens_per_s", "padding_share", "peak_rss_mb", "eval_s",
          "eval_tokens_per_s", "forward_tokens_per_s", "eval_vs_forward")


def run_rounds(a, variants: list[str]) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(a.rounds):
        for v in variants:  # interleaved: machine load drifts evenly over the variants
            cmd = [sys.executable, __file__, "--worker", v, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
                   "--max-length", str(a.max_length), "--eval-examples", str(a.eval_examples)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{v} failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results[v].append(res)
            print(f"round {r + 1} {v:20s} step {res['step_s']:.2f}s  {res['tokens_per_s']:.0f} tok/s  eval "
                  f"{res['eval_s']:.1f}s ({res['eval_vs_forward']:.2f} of forward speed)  peak RSS "
                  f"{res['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    return results


def report(a, results: dict, kind: dict, peak_flops: float) -> dict:
    med = {v: {k: statistics.median(x[k] for x in rs) for k in SUMMED} for v, rs in results.items()}
    params = next(iter(results.values()))[0]["params"]
    print(f"machine: {kind}; matmul peak {peak_flops / 1e9:.0f} GFLOP/s; model {params / 1e6:.0f}M parameters")
    print(f"batch {a.batch_size} x <= {a.max_length} tokens; {a.steps} timed steps x {a.rounds} rounds per variant; "
          f"evaluation of {a.eval_examples} held-out examples; medians")
    print(f"{'variant':20s} {'start s':>7s} {'step s':>7s} {'CPU s':>6s} {'tok/s':>7s} {'useful/s':>8s} {'pad %':>6s} {'MFU %':>6s} "
          f"{'eval s':>7s} {'eval/fwd':>8s} {'RSS MB':>7s}")
    for v, m in med.items():
        m["mfu"] = 6 * params * m["tokens_per_s"] / peak_flops
        print(f"{v:20s} {m['startup_s']:7.1f} {m['step_s']:7.2f} {m['cpu_s_per_step']:6.1f} {m['tokens_per_s']:7.0f} "
              f"{m['useful_tokens_per_s']:8.0f} {100 * m['padding_share']:6.1f} {100 * m['mfu']:6.1f} "
              f"{m['eval_s']:7.1f} {m['eval_vs_forward']:8.2f} {m['peak_rss_mb']:7.0f}")
    base = next((v for v in med if v.startswith("naive")), None)
    if base:
        for v, m in med.items():
            if v != base:
                print(f"{v} / {base}: step time {m['step_s'] / med[base]['step_s']:.3f}, CPU time per step "
                      f"{m['cpu_s_per_step'] / med[base]['cpu_s_per_step']:.3f}, tokens/s "
                      f"{m['tokens_per_s'] / med[base]['tokens_per_s']:.3f}, eval time "
                      f"{m['eval_s'] / med[base]['eval_s']:.3f}, peak RSS {m['peak_rss_mb'] / med[base]['peak_rss_mb']:.3f}")
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--batch-size", type=int, default=8, help="the default run's batch")
    ap.add_argument("--max-length", type=int, default=192, help="the default run's max length")
    ap.add_argument("--eval-examples", type=int, default=64)
    ap.add_argument("--variants", default="padded-sdpa,grouped-sdpa,packed-sdpa,padded-eager,padded-sdpa+keep,"
                                          "naive-sdpa")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.steps, a.batch_size, a.max_length, a.eval_examples)))
        return
    variants = [v for v in a.variants.split(",") if v]
    for v in variants:
        parse_variant(v)
    kind = machine_kind()
    peak = matmul_flops("bfloat16" if "bf16" in kind["precision"] else "float32")
    results = run_rounds(a, variants)
    med = report(a, results, kind, peak)
    if a.json:
        a.json.write_text(json.dumps({"args": vars(a), "machine": kind, "matmul_flops": peak, "runs": results,
                                      "medians": med}, indent=1, default=str))


if __name__ == "__main__":
    main()
