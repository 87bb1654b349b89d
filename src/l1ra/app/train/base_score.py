"""The base model's held-out score: computed once per model, held-out data and precision, then read from the cache.

Every `l1ra train` run scores the untrained model first (the "base" of its summary). That pass costs as much as any
evaluation and gives the same number every time the same model sees the same held-out tokens in the same precision,
so it is kept in `<cache>/base-scores/<key>.json` (cache: `$L1RA_CACHE`, else `~/.cache/l1ra`). The key covers what
the score depends on: the task, the model's files (path, names, sizes and modification times), the held-out tokens
and labels exactly as the Trainer feeds them, the device and precision (and a 4-bit base), and the torch and
transformers versions. A resumed run keeps the base of its first attempt (`metrics.json`) before looking here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from ...atomic import atomic_write_json

SCORED_COLUMNS = ("input_ids", "labels", "completion_mask", "attention_mask")  # what the held-out score reads


def model_identity(model_path: str) -> list:
    """The model folder's files as `[name, size, mtime_ns]` (a changed or re-converted file changes the key)."""
    root = Path(model_path)
    if not root.is_dir():
        return [str(model_path)]
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return [str(root.resolve())] + [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def base_score_key(task: str, model_path: str, eval_dataset, precision: str) -> str:
    import torch
    import transformers

    digest = hashlib.sha256()
    digest.update(json.dumps({"task": task, "model": model_identity(model_path), "precision": precision,
                              "torch": torch.__version__, "transformers": transformers.__version__}).encode())
    columns = [c for c in SCORED_COLUMNS if c in eval_dataset.column_names]
    for row in eval_dataset.select_columns(columns):
        digest.update(json.dumps([row[c] for c in columns]).encode())
    return digest.hexdigest()[:32]


def cache_file(key: str) -> Path:
    from ..assets import cache_dir

    return cache_dir() / "base-scores" / f"{key}.json"


def read_cached(key: str) -> Optional[dict]:
    try:
        score = json.loads(cache_file(key).read_text())
    except (OSError, ValueError):
        return None  # missing or unreadable: score again
    return score if isinstance(score, dict) and isinstance(score.get("loss"), (int, float)) else None


def write_cached(key: str, score: dict) -> None:
    """Best effort: a read-only or full cache folder costs the next run one evaluation, never this run."""
    try:
        cache_file(key).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache_file(key), score)
    except OSError:
        pass


def cached_base_score(key: str, procs) -> Optional[dict]:
    """Process 0's cached score, the same on every process (all of them evaluate, or none)."""
    score = read_cached(key) if procs.main else None
    if procs.world > 1:
        import torch.distributed as dist

        box = [score]
        dist.broadcast_object_list(box, src=0)
        score = box[0]
    return score


def score_base(trainer, model, key: Optional[str], procs, log) -> tuple[dict, bool]:
    """`(score, from_cache)`: the base model's held-out metrics, from the cache when this model, data and precision
    were scored before (`key` None: no cache)."""
    from .trainers import from_trainer_metrics

    score = cached_base_score(key, procs) if key else None
    if score is not None:
        log("l1ra: base model's held-out score from the cache (same model, data and precision)")
        return score, True
    log("l1ra: scoring the base model on the held-out set ...")
    with model.disable_adapter():  # on the device and in the precision that train
        score = from_trainer_metrics(trainer.evaluate())
    if key and procs.main:
        write_cached(key, score)
    return score, False
