"""Cost of L1RA over plain PEFT LoRA at the same rank budget, measured side by side in one process.

    python benchmarks/overhead.py                      # MiniLM and SmolLM2-135M
    python benchmarks/overhead.py --models minilm --steps 30
    python benchmarks/overhead.py --capacities 2 3 4   # L1RA at max_rank = 2r, 3r, 4r next to LoRA
    python benchmarks/overhead.py --no-timing          # peak memory only (one fresh process per method)

For each model: LoRA and L1RA train on the same batch, one step each, in turn (the order rotates every step), so
machine noise hits all alike. Prints the median step-time ratio (L1RA/LoRA, including `after_optimizer_step`), the
cost of one reallocation in training steps, and the peak-memory ratio: on CUDA from `max_memory_allocated`; on CPU
from the peak resident memory (`VmHWM`) of a fresh subprocess per method (which includes the base model, so it is the
whole-process figure a user sees; not `ru_maxrss`, which Linux carries over from this parent process). With several
--capacities, one L1RA model per capacity (max_rank = k x r) runs in the same rotation, and each gets its own ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, "src")


SHAPE = {}  # --batch-size / --seq-len overrides (a quick run: benchmarks/gpu_check.sh --cpu-dry-run)


def load(name: str, device):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from l1ra.app import minilm_dir, smollm2_dir

    if name == "minilm":
        path = minilm_dir()
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        targets, task, batch_size, length = ["query", "key", "value", "dense"], "SEQ_CLS", 16, 128
    else:
        path = smollm2_dir(verbose=False)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        targets, task, batch_size, length = "all-linear", "CAUSAL_LM", 8, 128
    tok = AutoTokenizer.from_pretrained(path)
    batch_size, length = SHAPE.get("batch_size", batch_size), SHAPE.get("seq_len", length)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, min(tok.vocab_size, 20000), (batch_size, length), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = torch.randint(0, 2, (batch_size,), generator=g) if task == "SEQ_CLS" else ids.clone()
    return model.to(device), {k: v.to(device) for k, v in batch.items()}, dict(r=8, lora_alpha=16, target_modules=targets, task_type=task)


def build(method: str, model, lora_kwargs):
    """'lora', 'l1ra' (default capacity) or 'l1ra_c<k>' (capacity max_rank = k x r)."""
    import peft

    import l1ra

    torch.manual_seed(0)
    if method == "lora":
        m = peft.get_peft_model(model, peft.LoraConfig(lora_dropout=0.0, **lora_kwargs))
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        return m, opt, lambda: None
    extra = {"max_rank": int(method[len("l1ra_c"):]) * lora_kwargs["r"]} if method.startswith("l1ra_c") else {}
    m = l1ra.get_l1ra_model(model, l1ra.L1RAConfig(lora_dropout=0.0, update_every=10**9, **lora_kwargs, **extra))
    opt = l1ra.create_optimizer(m, lr=1e-4)
    return m, opt, lambda: l1ra.after_optimizer_step(m, opt)


def step(model, opt, after, batch, device, autocast):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    after()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def reallocation_s(model, opt) -> float:
    """Median time of 5 reallocations, each after zeroing 25% of the gates."""
    import l1ra

    out = []
    for i in range(5):
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for gate in l1ra.gates(model).values():
                gate.masked_fill_(torch.rand(gate.shape, generator=gen).to(gate.device) < 0.25, 0.0)
        out.append(timed(lambda: l1ra.reallocate(model, opt)))
    return statistics.median(out)


def bench(name: str, steps: int, device, autocast: bool, methods=("lora", "l1ra")) -> dict:
    """Median step time of each method (all in one rotation), reallocation cost and trainable parameters of each."""
    import copy

    base, batch, lora_kwargs = load(name, device)
    runs = {m: build(m, copy.deepcopy(base), lora_kwargs) for m in methods}
    times = {m: [] for m in runs}
    for i in range(steps + 2):
        for m in methods[i % len(methods):] + methods[:i % len(methods)]:
            t = timed(lambda: step(*runs[m], batch, device, autocast))
            if i >= 2:  # warm-up
                times[m].append(t)
    med = {m: statistics.median(t) for m, t in times.items()}
    params = {m: sum(p.numel() for p in runs[m][0].parameters() if p.requires_grad) for m in methods}
    out = {"model": name, "steps": steps, "lora_step_s": med["lora"], "lora_trainable_params": params["lora"]}
    for m in methods[1:]:
        realloc = reallocation_s(*runs[m][:2])
        out[m] = {"step_s": med[m], "step_time_ratio": med[m] / med["lora"], "trainable_params": params[m],
                  "reallocation_s": realloc, "reallocation_in_steps": realloc / med[m], "times_s": times[m]}
    out["lora_times_s"] = times["lora"]
    return out


def peak_memory(name: str, method: str, device, autocast: bool, steps: int = 3) -> float:
    """Peak bytes of one method training alone: CUDA allocator peak, or a fresh process's peak RSS on CPU."""
    if device.type == "cuda":
        base, batch, kw = load(name, device)
        torch.cuda.reset_peak_memory_stats()
        run = build(method, base, kw)
        for _ in range(steps):
            step(*run, batch, device, autocast)
        return float(torch.cuda.max_memory_allocated())
    code = (
        f"import sys, torch; sys.path.insert(0, 'benchmarks'); import overhead as o; o.SHAPE.update({SHAPE!r}); "
        f"torch.set_num_threads({torch.get_num_threads()}); "
        f"base, batch, kw = o.load({name!r}, torch.device('cpu')); run = o.build({method!r}, base, kw); "
        f"[o.step(*run, batch, torch.device('cpu'), {autocast}) for _ in range({steps})]; "
        "from l1ra.app import peak_rss_mb; print(peak_rss_mb() * 2**20)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method (after 2 warm-up steps)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-bf16", action="store_true", help="disable bf16 autocast")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--batch-size", type=int, help="examples per batch (default: 16 MiniLM, 8 SmolLM2)")
    parser.add_argument("--seq-len", type=int, help="tokens per example (default: 128)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs (one fresh process each)")
    parser.add_argument("--no-timing", action="store_true", help="peak memory only: skip the step-time rotation")
    parser.add_argument("--capacities", nargs="+", type=int, metavar="K",
                        help="L1RA capacities to compare, as multiples k of r (max_rank = k x r); default: the "
                             "library's default capacity only")
    args = parser.parse_args(argv)
    SHAPE.update({k: v for k, v in (("batch_size", args.batch_size), ("seq_len", args.seq_len)) if v})
    device = torch.device(args.device)
    autocast = not args.no_bf16
    methods = ("lora", *([f"l1ra_c{k}" for k in args.capacities] if args.capacities else ["l1ra"]))
    if args.no_timing and args.no_memory:
        parser.error("--no-timing with --no-memory leaves nothing to measure")
    rows = []
    for name in args.models:
        row = {"model": name} if args.no_timing else bench(name, args.steps, device, autocast, methods)
        mem = {m: (float("nan") if args.no_memory else peak_memory(name, m, device, autocast)) for m in methods}
        row["peak_lora_mib"] = mem["lora"] / 2**20
        for m in methods[1:]:
            r = row.setdefault(m, {})
            r.update(peak_mib=mem[m] / 2**20, memory_ratio=mem[m] / mem["lora"])
            timing = "" if args.no_timing else (
                f"step L1RA/LoRA {r['step_time_ratio']:.3f} (median {r['step_s']:.3f}s vs {row['lora_step_s']:.3f}s "
                f"over {args.steps} steps in turn) | trainable params "
                f"{r['trainable_params'] / row['lora_trainable_params']:.2f}x LoRA's | one reallocation "
                f"{r['reallocation_in_steps']:.3f} steps ({r['reallocation_s'] * 1000:.0f} ms) | ")
            print(f"{name:8s} {m:8s} {timing}peak memory L1RA/LoRA {r['memory_ratio']:.3f} ({r['peak_mib']:.0f} vs "
                  f"{row['peak_lora_mib']:.0f} MiB)", flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "bf16_autocast": autocast, "torch_threads": torch.get_num_threads(), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
