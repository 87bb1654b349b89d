"""Training process launched by the DDP and resume tests (`python tests/integration/l1ra_worker.py ...`, under
`torchrun` or `accelerate launch` too). Writes its final adapter to `<out>/result-rank<R>.safetensors` and its rank
pattern and history to `<out>/result-rank<R>.json`.

Modes:
  plain   the plain-loop API: `after_optimizer_step(ddp_model, optimizer)`; under DDP each process takes its half of
          the same global batch, so a single process with the whole batch computes the same run.
  trainer `transformers.Trainer` + `L1RACallback` (DDP when launched by torchrun/accelerate), with optional
          --save-steps, --resume and --stop-after (write a marker and wait to be killed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from conftest import make_model  # noqa: E402

import l1ra  # noqa: E402

VOCAB, SEQ = 96, 12


def config(**overrides) -> l1ra.L1RAConfig:
    values = dict(
        r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", lora_dropout=0.0,
        l1ra_lambda=1.0, eta_c=0.1, update_every=4, seed=7,
    )
    values.update(overrides)
    return l1ra.L1RAConfig(**values)


def global_batch(step: int, size: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (size, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def write_result(out: Path, model, rank: int, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    peft_model = l1ra.find_l1ra_model(model)
    tensors = {n: p.detach().contiguous() for n, p in peft_model.named_parameters() if p.requires_grad}
    save_file(tensors, str(out / f"result-rank{rank}.safetensors"))
    info = {
        "ranks": l1ra.rank_pattern(peft_model),
        "history": l1ra.rank_history(peft_model).to_json(),
        "step": peft_model.l1ra_state.step,
        "reallocations": peft_model.l1ra_state.reallocations,
        **(extra or {}),
    }
    (out / f"result-rank{rank}.json").write_text(json.dumps(info))


def run_plain(args) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    model = l1ra.get_l1ra_model(make_model("llama", seed=0), config(**revive_options(args)))
    model.train()
    optimizer = l1ra.create_optimizer(model, lr=2e-2)
    wrapped = DDP(model, find_unused_parameters=args.find_unused, static_graph=args.static_graph) if world > 1 else model
    per_rank = args.global_batch // world
    live_before = l1ra.live_slots(model)
    extra = {"new_rank_grads": []}
    reducers = set()
    for step in range(1, args.steps + 1):
        batch = global_batch(step, args.global_batch)
        batch = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}
        loss = wrapped(**batch).loss
        loss.backward()
        if extra.get("pending_check"):
            # First backward after a reallocation: every new rank got a gradient, the same on every process.
            names = extra.pop("pending_check")
            grads = {}
            for name, layer in l1ra.find_l1ra_model(model).l1ra_state.layers:
                if name in names:
                    new = names[name]  # the revived slots
                    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                    gate = layer.l1ra_gate["default"]
                    assert a.grad is not None and b.grad is not None and gate.grad is not None, name
                    grads[name] = torch.cat([a.grad[new].flatten(), b.grad[:, new].flatten(), gate.grad[new]])
            flat = torch.cat(list(grads.values())) if grads else torch.zeros(0)
            if world > 1:
                gathered = [torch.zeros_like(flat) for _ in range(world)]
                dist.all_gather(gathered, flat)
                same = all(torch.equal(g, gathered[0]) for g in gathered)
            else:
                same = True
            extra["new_rank_grads"].append(
                {"step": step, "modules": len(grads), "equal_across_ranks": same, "nonzero": bool(flat.abs().sum() > 0)}
            )
        optimizer.step()
        event = l1ra.after_optimizer_step(wrapped, optimizer)
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            reducers.add(id(wrapped.reducer))
        if event is not None and event.added:
            live = l1ra.live_slots(model)
            extra["pending_check"] = {n: sorted(set(live[n]) - set(live_before[n])) for n in event.added}
        live_before = l1ra.live_slots(model)
    extra["reducers_seen"] = len(reducers)
    write_result(Path(args.out), model, rank, extra)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


class StopAfter:
    """Trainer callback: after optimizer step N, write a marker file and sleep until killed."""

    def __init__(self, step: int, marker: Path):
        self.step, self.marker = step, marker

    def __call__(self, state):
        if state.global_step == self.step:
            self.marker.write_text(str(self.step))
            while True:
                time.sleep(1)


def _fake_quantized_cast(model, out: Path):
    """What TRL's SFTTrainer does to a 4-bit base before the Trainer exists: every trainable parameter (the gates
    too) cast to bf16. The base is marked quantized the way transformers marks it (`hf_quantizer`), so L1RA restores
    the gates; no bitsandbytes kernel runs. Returns a X."""
    from types import SimpleNamespace

    from transformers import TrainerCallback

    model.get_base_model().hf_quantizer = SimpleNamespace(is_trainable=True, is_qat_trainable=False)
    for gate in l1ra.gates(model).values():
        gate.data = gate.data.to(torch.bfloat16)
    rank = int(os.environ.get("RANK", "0"))

    class RecordGateGrads(TrainerCallback):
        def on_pre_optimizer_step(self, a, state, control, **kw):
            if state.global_step == 1:  # the second step: B is still zero at the first, and so are these
                grads = {n: g.grad.detach().clone() for n, g in l1ra.gates(model).items()}
                from safetensors.torch import save_file

                save_file(grads, str(out / f"gate-grads-rank{rank}.safetensors"))

    return RecordGateGrads()


def run_trainer(args) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    model = l1ra.get_l1ra_model(make_model("llama", seed=0), config(
        lora_dropout=0.1, update_every=3, l1ra_lambda=3.0, **revive_options(args)))
    data = [global_batch(i, 1) for i in range(64)]
    data = [{k: v[0] for k, v in d.items()} for d in data]
    out = Path(args.out)
    targs = TrainingArguments(
        output_dir=str(out / "ckpt"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=2e-2, lr_scheduler_type="linear", warmup_steps=0, logging_strategy="no",
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
        save_only_model=False,
    )
    callbacks = [l1ra.L1RACallback()]
    if args.quantized_cast:
        callbacks.append(_fake_quantized_cast(model, out))
    if args.stop_after:
        stop = StopAfter(args.stop_after, out / "stopped")

        class _Stop(TrainerCallback):
            def on_step_end(self, a, state, control, **kw):
                stop(state)

        callbacks.append(_Stop())
    trainer = Trainer(
        model=model, args=targs, train_dataset=data,
        optimizers=(l1ra.create_optimizer(model, lr=2e-2), None), callbacks=callbacks,
    )
    params_before = {n: id(p) for n, p in model.named_parameters() if p.requires_grad}
    trainer.train(resume_from_checkpoint=args.resume)
    # The optimizer trains the model's own parameters (after a resume whose ranks moved, too).
    opt_ids = {id(p) for g in trainer.optimizer.optimizer.param_groups for p in g["params"]} \
        if hasattr(trainer.optimizer, "optimizer") else {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    model_ids = {id(p) for p in model.parameters() if p.requires_grad}
    rank = int(os.environ.get("RANK", "0"))
    extra = {
        "optimizer_holds_model_params": opt_ids == model_ids,
        "params_never_replaced": {n: id(p) for n, p in model.named_parameters() if p.requires_grad} == params_before,
        "world_size": trainer.args.world_size,
        "gate_dtypes": sorted({str(g.dtype) for g in l1ra.gates(model).values()}),
    }
    write_result(out, model, rank, extra)


def revive_options(args) -> dict:
    """How new ranks start (issue 24): --new-rank-init gradient, --grace K."""
    return dict(new_rank_init=args.new_rank_init, new_rank_grace=args.grace)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["plain", "trainer"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--find-unused", action="store_true")
    parser.add_argument("--static-graph", action="store_true")
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--stop-after", type=int, default=0)
    parser.add_argument("--quantized-cast", action="store_true")
    parser.add_argument("--new-rank-init", default="random")
    parser.add_argument("--grace", type=int, default=0)
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    run_plain(args) if args.mode == "plain" else run_trainer(args)


if __name__ == "__main__":
    main()
