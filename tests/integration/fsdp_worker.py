"""L1RA under FSDP2 (`fully_shard`) in a plain training loop, launched by tests/integration/test_fsdp.py.

  python tests/integration/fsdp_worker.py train --out DIR [--fsdp] ...
      (under `torch.distributed.run --nproc_per_node N`)
  python tests/integration/fsdp_worker.py peft-logits --adapter DIR --out FILE   (plain PEFT, never imports l1ra)

`train` builds the tiny Llama, applies `l1ra.get_l1ra_model` (or `l1ra.from_pretrained(..., is_trainable=True)` with
--resume), then with --fsdp `fully_shard` on each decoder layer and on the root PeftModel over a gloo CPU mesh, and
trains with `l1ra.create_optimizer` and `l1ra.after_optimizer_step`; every process takes its share of the same global
batch, so one process without FSDP and the whole batch computes the same run. At the end it calls `l1ra.reallocate`
once more, then writes (every process calls the saves, as users do):
  result-rank<R>.safetensors / .json   full (gathered) trainable tensors; rank pattern, history, step
  adapter/                             model.save_pretrained(dir)
  adapter-fullsd/                      model.save_pretrained(dir, state_dict=<get_model_state_dict(full_state_dict)>)
  adapter-rank0/                       the same called on rank 0 only (as Trainer.save_model does under FSDP)
  logits.pt                            the trained model's logits on a fixed batch (rank 0)
With --save-at K it stops after step K and writes ckpt/ (save_pretrained) and ckpt/optimizer.pt (the optimizer's
full state dict from torch.distributed.checkpoint) instead; --resume DIR continues such a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

VOCAB, SEQ = 96, 12


def global_batch(step: int, size: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (size, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def eval_batch() -> dict:
    ids = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(4242))
    return {"input_ids": ids}


def config():
    import l1ra

    # A large lambda and a short interval: gates reach 0 within a few steps and ranks move at most reallocations.
    return l1ra.L1RAConfig(
        r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", lora_dropout=0.0,
        l1ra_lambda=3.0, eta_c=0.1, update_every=3, seed=7,
    )


def build(args, world: int):
    """The L1RA model (new, or resumed), sharded with FSDP2 when --fsdp."""
    import l1ra
    from conftest import make_model

    base = make_model("llama", seed=0)
    if args.resume:
        model = l1ra.from_pretrained(base, args.resume, is_trainable=True)
    else:
        model = l1ra.get_l1ra_model(base, config())
    model.train()
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        mesh = init_device_mesh("cpu", (world,))
        for module in model.modules():
            if isinstance(module, LlamaDecoderLayer):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def gathered_trainable(model) -> dict:
    """Every trainable tensor in full, on every process (`full()` is a collective: same order everywhere)."""
    from l1ra import sharded

    return {n: sharded.full(p).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(model, optimizer, directory: Path, rank: int) -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model.save_pretrained(directory)
    osd = get_optimizer_state_dict(model, optimizer, options=state_dict_options(cpu_offload=True))
    if rank == 0:
        torch.save(osd, directory / "optimizer.pt")


def load_optimizer(model, optimizer, directory: Path) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    osd = torch.load(directory / "optimizer.pt", weights_only=False)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=osd, options=state_dict_options())


def finish(model, optimizer, out: Path, rank: int, world: int) -> None:
    import l1ra
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    event = l1ra.reallocate(model, optimizer)  # one reallocation outside the schedule, as users may call it
    tensors = gathered_trainable(model)
    save_file(tensors, str(out / f"result-rank{rank}.safetensors"))
    st = l1ra.find_l1ra_model(model).l1ra_state
    info = {
        "ranks": l1ra.rank_pattern(model), "history": l1ra.rank_history(model).to_json(), "step": st.step,
        "reallocations": st.reallocations, "last_moved": event.moved, "world": world,
        "is_dtensor": type(next(p for p in model.parameters() if p.requires_grad)).__name__,
    }
    (out / f"result-rank{rank}.json").write_text(json.dumps(info))
    model.save_pretrained(out / "adapter")
    full_sd = get_model_state_dict(model, options=state_dict_options())
    model.save_pretrained(out / "adapter-fullsd", state_dict=full_sd)
    # What Trainer.save_model does under FSDP (FULL_STATE_DICT): gather on every process (with cpu_offload only rank 0
    # gets the tensors), then save_pretrained on the main process alone: no collective may run inside it.
    rank0_sd = get_model_state_dict(model, options=state_dict_options(cpu_offload=True))
    if rank == 0:
        model.save_pretrained(out / "adapter-rank0", state_dict=rank0_sd, is_main_process=True)
    model.eval()
    with torch.no_grad():
        logits = model(**eval_batch()).logits
    if rank == 0:
        torch.save(logits, out / "logits.pt")


def train(args) -> None:
    import torch.distributed as dist

    import l1ra

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.fsdp:
        dist.init_process_group("gloo")
    out = Path(args.out)
    model = build(args, world)
    optimizer = l1ra.create_optimizer(model, lr=2e-2)
    start = 0
    if args.resume:
        load_optimizer(model, optimizer, Path(args.resume))
        start = l1ra.find_l1ra_model(model).l1ra_state.step
    per_rank = args.global_batch // world
    for step in range(start + 1, args.steps + 1):
        batch = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in global_batch(step, args.global_batch).items()}
        model(**batch).loss.backward()
        optimizer.step()
        l1ra.after_optimizer_step(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        if step == args.save_at:
            save_checkpoint(model, optimizer, out / "ckpt", rank)
            break
    else:
        finish(model, optimizer, out, rank, world)
    if args.fsdp:
        dist.barrier()
        dist.destroy_process_group()


def peft_logits(args) -> None:
    """Plain PEFT in a process that never imports l1ra: load the saved adapter, write its logits."""
    from peft import PeftModel

    from conftest import make_model

    model = PeftModel.from_pretrained(make_model("llama", seed=0), args.adapter).eval()
    with torch.no_grad():
        logits = model(**eval_batch()).logits
    assert not any(name == "l1ra" or name.startswith("l1ra.") for name in sys.modules), "l1ra was imported"
    torch.save(logits, args.out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "peft-logits"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--save-at", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--adapter", default=None)
    args = parser.parse_args()
    if args.mode == "peft-logits":
        return peft_logits(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    train(args)


if __name__ == "__main__":
    main()
