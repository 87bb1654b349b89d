"""`l1ra compare --dataset FILE [--model M]`: does moving rank help on *your* data?

The file is read by `l1ra train`'s own loader (`l1ra.app.train.data`: .json, .jsonl, .csv or .parquet; prompt/completion,
chat messages or plain text rows, found by column name or named with the same column flags). Two splits are carved
from it, each by a fixed seeded shuffle (the same for every run and seed, so runs pair by seed):

- the test split (scored once per final run): 10% of the rows, at least `MIN_SPLIT`, at most `MAX_TEST`;
- the dev split (for `--tune`), from the rest: 10% of the rows, at least `MIN_SPLIT`, at most `MAX_DEV`
  (`--dev-size` overrides it);
- the remaining rows train, in file order; a file needs at least `MIN_ROWS` rows.

The score is the held-out answer-token loss (the tokens `l1ra train` puts the loss on: completions, assistant turns,
or every token of plain text), as for the GSM8K task. `l1ra train` trains causal LMs on user data, so there is no
classification score here. Light at import: the parent process plans with `describe_file`, each run's own process
builds the task with `dataset_task`.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from ..train.data import DataError
from .tasks import DEV_SEED, Task, carve_dev, pick_split, shuffled_batches

MIN_SPLIT = 10  # examples in the dev and in the test split, at the least
MIN_TRAIN = 20  # training rows left after both splits, at the least
MIN_ROWS = MIN_TRAIN + 2 * MIN_SPLIT
MAX_TEST, MAX_DEV = 500, 200
TEST_SEED = DEV_SEED + 1  # the test split's fixed shuffle (the dev split then uses DEV_SEED on the rest)


def split_sizes(file: str, n_rows: int) -> tuple[int, int]:
    """(test size, dev size) for a file of `n_rows` rows; DataError when it is too small to split."""
    if n_rows < MIN_ROWS:
        raise DataError(f"--dataset {file}: {n_rows} rows, too few to carve a dev and a test split; l1ra compare needs "
                        f"at least {MIN_ROWS} rows ({MIN_SPLIT} test, {MIN_SPLIT} dev, {MIN_TRAIN} to train)")
    share = n_rows // 10
    return min(MAX_TEST, max(MIN_SPLIT, share)), min(MAX_DEV, max(MIN_SPLIT, share))


def carve_splits(rows: list, test_size: int, dev_size: int) -> tuple[list, list, list]:
    """(train, dev, test): the test split first (seed `TEST_SEED`), then the dev split from the rest (`DEV_SEED`, as
    every task's); disjoint, the same for every run, and the training rows keep the file's order."""
    rest, test = carve_dev(rows, test_size, seed=TEST_SEED)
    train, dev = carve_dev(rest, dev_size)
    return train, dev, test


def _read_rows(file: str) -> list[dict]:
    from ..train import data

    if not Path(file).expanduser().is_file():
        raise DataError(f"--dataset {file}: no such file; l1ra compare takes a local .json, .jsonl, .csv or .parquet "
                        "file")
    rows = data.load_rows(file)["train"]
    if not rows:
        raise DataError(f"--dataset {file}: holds no rows")
    return rows


def _checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def describe_file(file: str, *, model: Optional[str] = None, **columns: Optional[str]) -> tuple[dict, int]:
    """(the runs' `user_data`, the default dev size) for `--dataset file`: checks the file, its format (column flags
    as in `l1ra train`), its size and the model before any run starts. The checksum keys the runs in results.json:
    a changed file is a new comparison."""
    from ..train import data
    from ..train.models import resolve_model_path

    rows = _read_rows(file)
    fmt = data.detect_format(rows[0].keys(), **columns)
    test_size, dev_size = split_sizes(file, len(rows))
    path = Path(file).expanduser().resolve()
    model_path = resolve_model_path(model)
    if Path(model_path).expanduser().exists():
        model_path = str(Path(model_path).expanduser().resolve())
    user_data = {"file": str(path), "sha256": _checksum(path), "rows": len(rows), "model": model_path,
                 "format": asdict(fmt), "test_size": test_size}
    return user_data, dev_size


def dataset_task(max_length: int, eval_limit: Optional[int], dev_size: int, user_data: dict) -> Task:
    """The task of `user_data` (see `describe_file`): the model, the carved splits tokenised as `l1ra train` does."""
    from ..train import data
    from ..train.models import load_model, load_tokenizer
    from .lm import answer_loss, pad

    file, model_path = user_data["file"], user_data["model"]
    if _checksum(Path(file)) != user_data["sha256"]:
        raise DataError(f"--dataset {file}: the file changed since this comparison was planned; run l1ra compare again")
    fmt = data.Format(**user_data["format"])
    train_rows, dev_rows, test_rows = carve_splits(_read_rows(file), user_data["test_size"], dev_size)
    tokenizer = load_tokenizer(model_path)

    def encode(rows: list, name: str) -> list:
        examples, _ = data.tokenize_rows(tokenizer, rows, fmt, max_length)
        if rows and not examples:
            raise DataError(f"--dataset {file}: no usable {name} example in {fmt.describe()} (empty, or no loss token "
                            f"left within --max-length {max_length})")
        return examples

    train, dev, test = encode(train_rows, "training"), encode(dev_rows, "dev"), encode(test_rows, "test")
    if eval_limit is not None:
        test, dev = test[:eval_limit], dev[:eval_limit]
    pad_id = tokenizer.pad_token_id

    def evaluate(model, split="test", device="cpu", amp_dtype=None):
        return answer_loss(model, pick_split(split, dev, test), pad_id, device=device, amp_dtype=amp_dtype)

    name = Path(file).name
    return Task(
        name="dataset",
        score_name="loss",
        higher_is_better=False,
        task_type="CAUSAL_LM",
        target_modules="all-linear",
        load_model=lambda: load_model(model_path, "causal-lm"),
        train_batches=lambda seed, steps, bs: shuffled_batches(train, seed, steps, bs, lambda r: pad(r, pad_id)),
        evaluate=evaluate,
        bf16_autocast=True,
        description=f"{model_path} on {name} ({len(train)} training examples, {fmt.describe()}), held-out "
        f"answer-token loss ({len(test)} examples)",
        splits={
            "train": {"name": f"{name} minus test and dev", "size": len(train)},
            "dev": {"name": f"{name} rows carved from the rest (seed {DEV_SEED})", "size": len(dev)},
            "test": {"name": f"{name} rows held out (seed {TEST_SEED})", "size": len(test)},
        },
    )
