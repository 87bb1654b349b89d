"""Check L1RA under FSDP2 through `transformers.Trainer` / Accelerate on CUDA (1 or more GPUs).

    torchrun --nproc_per_node 1 benchmarks/gpu_fsdp_check.py --out /tmp/l1ra-fsdp   # one GPU: a 1-device mesh
    torchrun --nproc_per_node N benchmarks/gpu_fsdp_check.py --out /tmp/l1ra-fsdp   # N GPUs

On a CPU the Trainer silently falls back to DDP (MULTI_CPU), so this only proves the FSDP2 path on GPUs;
`--allow-cpu` runs the same script on the CPU fallback to check the script itself. A tiny random Llama (no download)
is trained with `fsdp="full_shard"`, `fsdp_config={"version": 2, "state_dict_type": "FULL_STATE_DICT"}`, a Trainer
subclass whose `create_optimizer` calls `l1ra.create_optimizer` (the Trainer refuses `optimizers=` under FSDP) and
`l1ra.L1RACallback`. It checks: Accelerate runs FSDP with DTensor gates; ranks move at several reallocations;
`trainer.save_model()` writes a PEFT adapter whose logits in plain PEFT equal the sharded model's; a run resumed from
checkpoint-6 (model rebuilt with `l1ra.from_pretrained(..., is_trainable=True)`, then
`train(resume_from_checkpoint=...)`) ends with the uninterrupted run's ranks and history. Prints one JSON line;
exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import l1ra  # noqa: E402
from conftest import make_model  # noqa: E402
from fsdp_worker import config, eval_batch, global_batch  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402


class L1RATrainer(Trainer):
    """Under FSDP the Trainer refuses `optimizers=(...)`: build L1RA's optimizer (gates at eta_c) here instead."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = l1ra.create_optimizer(self.model, lr=self.args.learning_rate)
        return self.optimizer


def make_trainer(model, out: Path, args, steps: int) -> Trainer:
    cpu = args.allow_cpu and not torch.cuda.is_available()
    targs = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, learning_rate=2e-2,
        lr_scheduler_type="constant", logging_strategy="no", save_strategy="steps", save_steps=6,
        report_to=[], seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True, use_cpu=cpu,
        fsdp="full_shard",
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                     "state_dict_type": "FULL_STATE_DICT"},
    )
    data = [{k: v[0] for k, v in global_batch(i, 1).items()} for i in range(64)]
    return L1RATrainer(model=model, args=targs, train_dataset=data, callbacks=[l1ra.L1RACallback()])


def logits_of(model) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(**{k: v.to(device) for k, v in eval_batch().items()}).logits.float().cpu()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--allow-cpu", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    rank = int(os.environ.get("RANK", "0"))

    model = l1ra.get_l1ra_model(make_model("llama", seed=0), config())
    trainer = make_trainer(model, out / "run", args, args.steps)
    trainer.train()
    events = next(c for c in trainer.callback_handler.callbacks if isinstance(c, l1ra.L1RACallback)).events
    gate = next(iter(l1ra.gates(trainer.model).values()))
    checks = {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "world_size": trainer.args.world_size,
        "gates_are_dtensors": type(gate).__name__ == "DTensor",
        "reallocations_moving_ranks": sum(e.moved > 0 for e in events),
        "ranks": l1ra.rank_pattern(trainer.model),
    }
    history = l1ra.rank_history(trainer.model).to_json()
    trainer.save_model(str(out / "final"))
    sharded_logits = logits_of(trainer.model)

    # Resume: the L1RA state (live slots, step, history) comes from the L1RA save inside the checkpoint; the
    # Trainer's FSDP resume (load_fsdp_model) restores the weights and the optimizer but not that state.
    ckpt = out / "run" / "checkpoint-6"
    resumed = l1ra.from_pretrained(make_model("llama", seed=0), ckpt, is_trainable=True)
    trainer2 = make_trainer(resumed, out / "resumed", args, args.steps)
    trainer2.train(resume_from_checkpoint=str(ckpt))
    checks["resume_same_ranks"] = l1ra.rank_pattern(trainer2.model) == checks["ranks"]
    checks["resume_same_history"] = l1ra.rank_history(trainer2.model).to_json() == history

    ok = (checks["distributed_type"].endswith("FSDP") or args.allow_cpu) and checks["reallocations_moving_ranks"] >= 2
    ok = ok and (checks["gates_are_dtensors"] or args.allow_cpu) and checks["resume_same_ranks"]
    ok = ok and checks["resume_same_history"]
    if rank == 0:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(make_model("llama", seed=0), str(out / "final"))
        diff = float((logits_of(peft_model) - sharded_logits).abs().max())
        checks["peft_logits_max_diff"] = diff
        ok = ok and diff < 1e-4
        checks["ok"] = bool(ok)
        print(json.dumps(checks))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
