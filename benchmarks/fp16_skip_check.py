"""fp16 with the Trainer's loss scaler and fused AdamW: a step the scaler skips must not move the L1RA gates.

With a fused optimizer `GradScaler` always calls `optimizer.step()` and the kernel skips the update itself, so
Accelerate's `step_was_skipped` stays False (issue 20, item 2). This script trains through `transformers.Trainer`
(fp16=True, `l1ra.create_optimizer(..., fused=True)`, `L1RACallback`), turns one LoRA gradient to inf on chosen
steps (before the scaler unscales, so the scaler must skip them), and records for every optimizer step whether the
scaler skipped it (its scale went down) and whether any gate changed. fp16 runs usually skip a few steps at the
start by themselves too (the scaler starts at 2**16).

    PYTHONPATH=src python benchmarks/fp16_skip_check.py                          # SmolLM2-135M on CUDA
    PYTHONPATH=src python benchmarks/fp16_skip_check.py --model tiny --device cpu --steps 6 --poison 3  # CPU

On the CPU (plumbing only: Accelerate gives fp16 no scaler there) the script hands the Trainer torch's CPU
GradScaler, so the same scaler/optimizer path runs.

Prints one line and exits 1 when a skipped step moved a gate (or nothing was skipped, or no step moved a gate).
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch

sys.path.insert(0, "src")


def load(name: str, device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = torch.float16 if device == "cuda" else torch.float32  # the app's plan: fp16 base with the scaler
    if name == "tiny":
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
        return LlamaForCausalLM(cfg).to(dtype), 256
    from l1ra.app import smollm2_dir

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(verbose=False), dtype=dtype)
    return model, model.config.vocab_size


class Probe:
    """Trainer callback: inf gradients on chosen steps, gates and scaler scale before/after every step."""

    def __init__(self, model, poison_steps):
        import l1ra
        from transformers import TrainerCallback

        self.l1ra, self.model, self.poison_steps = l1ra, model, set(poison_steps)
        self.trainer, self.rows, self.step = None, [], 0
        target = next(p for n, p in model.named_parameters() if "lora_B" in n)
        target.register_hook(lambda g: torch.full_like(g, float("inf")) if self.step in self.poison_steps else g)
        probe = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                probe.step = state.global_step + 1
                probe.before = {k: g.detach().clone() for k, g in probe.l1ra.gates(probe.model).items()}
                probe.scale = probe._scale()

            def on_step_end(self, args, state, control, **kwargs):
                gates = probe.l1ra.gates(probe.model)
                moved = any(not torch.equal(gates[k], v) for k, v in probe.before.items())
                finite = all(bool(torch.isfinite(g).all()) for g in gates.values())
                probe.rows.append({"step": probe.step, "skipped": probe._scale() < probe.scale, "moved": moved,
                                   "finite": finite, "poisoned": probe.step in probe.poison_steps})

        self.callback = _Callback()

    def _scale(self) -> float:
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None else float("nan")


def main(argv=None) -> int:
    import datasets
    import l1ra
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--poison", type=int, nargs="*", default=[4, 8], help="steps whose gradient is set to inf")
    args = parser.parse_args(argv)

    base, vocab = load(args.model, args.device)
    model = l1ra.get_l1ra_model(base, l1ra.L1RAConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                     task_type="CAUSAL_LM", lora_dropout=0.0, update_every=10**6))
    optimizer = l1ra.create_optimizer(model, lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (4 * args.steps, 64), generator=g).tolist()
    data = datasets.Dataset.from_list([{"input_ids": row, "labels": row} for row in ids])
    probe = Probe(model, args.poison)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=4, fp16=True,
                                  use_cpu=args.device == "cpu", learning_rate=1e-4, lr_scheduler_type="constant",
                                  logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                                  max_grad_norm=1.0)
        trainer = Trainer(model=model, args=targs, train_dataset=data, optimizers=(optimizer, None),
                          callbacks=[l1ra.L1RACallback(), probe.callback])
        trainer.remove_callback(PrinterCallback)  # no log dict per step
        if trainer.accelerator.scaler is None:  # Accelerate scales fp16 losses on GPUs only; same path on the CPU
            trainer.accelerator.scaler, trainer.accelerator.native_amp = torch.amp.GradScaler(args.device), True
        probe.trainer = trainer
        trainer.train()
    rows = probe.rows
    skipped = [r["step"] for r in rows if r["skipped"]]
    bad = [r["step"] for r in rows if r["skipped"] and r["moved"]]
    ok = bool(skipped) and not bad and all(r["finite"] for r in rows) and any(r["moved"] for r in rows)
    print(f"fp16 fused AdamW ({args.model}, {args.device}): {len(rows)} steps, skipped {skipped} "
          f"(poisoned {sorted(probe.poison_steps)}), gates moved on skipped steps: {bad or 'none'}, gates finite: "
          f"{all(r['finite'] for r in rows)} -> {'PASS' if ok else 'FAIL'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
