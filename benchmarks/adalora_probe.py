"""Why AdaLoRA stays near chance in short `l1ra compare --task sentiment` runs: print its classification loss (without
the orthogonality penalty PEFT adds to the loss) and the mean |singular value| E every 10 steps.

    python benchmarks/adalora_probe.py --steps 80                              # PEFT's defaults, lr 1e-3
    python benchmarks/adalora_probe.py --steps 80 --method adalora_paper --lr 1e-2

Same model, batches, lr schedule and AdaLoRA settings as `l1ra compare` (r 12 -> 8; `--method` picks the row).
"""

import argparse

import torch
import torch.nn.functional as F

from l1ra.app.compare import ADALORA_SETTINGS, RunSpec, build_task, lr_lambda, wrap_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--method", choices=sorted(ADALORA_SETTINGS), default="adalora")
    args = p.parse_args()
    torch.set_num_threads(1)
    task = build_task("sentiment", 64, None)
    spec = RunSpec(task="sentiment", method=args.method, seed=0, steps=args.steps, batch_size=16, lr=args.lr,
                   max_length=64, **ADALORA_SETTINGS[args.method])
    torch.manual_seed(0)
    base = task.load_model()
    torch.manual_seed(0)
    pm, opt, after_step = wrap_model(args.method, base, task, spec)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps, spec.warmup_ratio))
    for step, batch in enumerate(task.train_batches(0, args.steps, 16), 1):
        out = pm(**batch)
        out.loss.backward()  # PEFT's AdaLoRA loss: task loss + orthogonality penalty
        torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        opt.step()
        after_step(step, opt)
        sched.step()
        opt.zero_grad()
        if step % 10 == 0:
            e = [m.lora_E["default"].abs().mean().item() for m in pm.modules() if hasattr(m, "lora_E")
                 and "default" in m.lora_E]
            ce = F.cross_entropy(out.logits.detach(), batch["labels"]).item()
            print(f"step {step}: loss {out.loss.item():.3f}, task loss {ce:.3f}, mean |E| {sum(e) / len(e):.4f}",
                  flush=True)


if __name__ == "__main__":
    main()
