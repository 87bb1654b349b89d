"""What a task of `l1ra compare` is, the defaults of each task, and the splits every task carves the same way.

A task is a fresh base model, the training batches in a fixed order and the scorer; it is built once per run, inside
the run's own process (`worker.build_task`), so nothing leaks between methods. The built-in tasks are in
`builtin.py`, a user's file (`--dataset`) in `dataset.py`. This module is light (no torch at import).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass


class Task:
    name: str
    score_name: str  # key of the headline score in `evaluate`'s result
    higher_is_better: bool
    task_type: str  # PEFT TaskType name
    target_modules: object  # list of names or "all-linear"
    load_model: Callable[[], object]  # a fresh base model (torch module), same weights every call
    train_batches: Callable[[int, int, int], list]  # (seed, steps, batch_size) -> one batch dict per step (on CPU)
    # (model, split, device, amp_dtype) -> {score_name: float, ...}; split "dev" (carved from the training data, for
    # tuning) or "test" (the reported split)
    evaluate: Callable[..., dict]
    bf16_autocast: bool = False  # low-precision autocast helps this task (bf16 on CPU, bf16/fp16 on CUDA)
    description: str = ""
    splits: dict = field(default_factory=dict)  # {"train"|"dev"|"test": {"name": str, "size": int}}
    head_modules: tuple = ()  # the classification head (the head_only row trains only these); () for LM tasks


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
        # batch 4 x 128 tokens: at 8 x 256 a CPU run took about 4x the time and 3x the memory of 4 x 128, too much
        # for two runs side by side on the machine the shipped evidence ran on
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
    # a user's file (--dataset): `l1ra train`'s batch, length and learning rate for a causal LM; the dev and test
    # sizes follow the file's row count (dataset.split_sizes), so dev_size here is unused
    "dataset": {
        "full": TaskDefaults(steps=150, batch_size=8, lr=2e-4, seeds=3, max_length=192, eval_limit=None,
                             lr_grid=(1e-4, 2e-4, 5e-4)),
        "quick": TaskDefaults(steps=10, batch_size=8, lr=2e-4, seeds=1, max_length=192, eval_limit=32,
                              lr_grid=(1e-4, 2e-4, 5e-4)),
    },
}
BUILTIN_TASKS = ("sentiment", "gsm8k", "tiny")
CLASSIFICATION_TASKS = ("sentiment",)

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


def shuffled_batches(examples: list, seed: int, steps: int, batch_size: int, collate) -> list:
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
