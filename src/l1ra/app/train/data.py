"""Data for `l1ra train`: user datasets, formats and tokenisation (the shipped GSM8K and sentiment sets are in
shipped_data.py).

Rows are plain dicts. Three formats are understood:

- prompt/completion: `{"prompt": str, "completion": str}`; the loss is on the completion tokens only;
- chat messages: `{"messages": [{"role": ..., "content": ...}, ...]}`; the loss is on the assistant turns only;
- plain text: `{"text": str}`; the loss is on every token.

`sft_rows` hands rows to TRL's `SFTTrainer` in its formats (prompt/completion, conversational when the tokenizer has a
chat template; language modelling `text`), so TRL tokenises them with completion-only loss. Chat messages are
tokenised here (`tokenize_messages`): TRL's assistant-only loss needs `{% generation %}` markers that most chat
templates (SmolLM2's among them) lack. Tokenised examples are `{"input_ids", "labels", "attention_mask"}` lists with
label -100 on tokens that carry no loss; `tokenize_prompt_completion` is the reference the TRL path is tested against.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from ..errors import UserError

IGNORE_INDEX = -100
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(UserError, ValueError):
    """A dataset that cannot be used; the message names the file or column and what to change."""


# --------------------------------------------------------------------------------------------------------------
# User datasets


def load_rows(spec: str, split: Optional[str] = None) -> dict[str, list[dict]]:
    """Load a dataset as `{split_name: rows}`.

    `spec` is a local `.json`, `.jsonl`, `.csv` or `.parquet` file (one split, "train"), or a Hugging Face Hub dataset
    name (`name` or `name:config`), loaded with `datasets.load_dataset` only because the user asked for it.
    """
    import datasets

    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    looks_local = path.exists() or suffix in LOCAL_SUFFIXES or spec.startswith((".", "/", "~"))
    if looks_local:
        if not path.exists():
            raise DataError(f"--dataset {spec}: file not found")
        if path.is_dir():
            raise DataError(f"--dataset {spec}: is a directory; give a .json, .jsonl, .csv or .parquet file")
        if suffix not in LOCAL_SUFFIXES:
            raise DataError(
                f"--dataset {spec}: unknown format {suffix or '(no suffix)'}; use a .json, .jsonl, .csv or .parquet file"
            )
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as err:
            raise DataError(f"--dataset {spec}: cannot read the file ({err.strerror})") from None
        if path.stat().st_size == 0:
            raise DataError(f"--dataset {spec}: the file is empty")
        try:
            ds = datasets.load_dataset(LOCAL_SUFFIXES[suffix], data_files=str(path), split="train")
        except Exception as err:  # datasets raises many types for malformed files
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(f"--dataset {spec}: cannot parse it as {suffix[1:]} ({first[:200]})") from None
        return {"train": ds.to_list()}
    name, _, config = spec.partition(":")
    try:
        loaded = datasets.load_dataset(name, config or None)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"--dataset {spec}: not a local file, and loading it from the Hugging Face Hub failed ({first[:200]})"
        ) from None
    splits = {k: v.to_list() for k, v in loaded.items()}
    if split is not None:
        if split not in splits:
            raise DataError(f"--dataset {spec}: no split {split!r} (it has {', '.join(splits)})")
    return splits


@dataclass(frozen=True)
class Format:
    """How rows are read: `kind` is 'prompt-completion', 'messages' or 'text'; the column names to read."""

    kind: str
    prompt: Optional[str] = None
    completion: Optional[str] = None
    messages: Optional[str] = None
    text: Optional[str] = None

    def describe(self) -> str:
        if self.kind == "prompt-completion":
            return f"prompt/completion (columns {self.prompt!r}, {self.completion!r})"
        if self.kind == "messages":
            return f"chat messages (column {self.messages!r})"
        return f"plain text (column {self.text!r})"


PROMPT_ALIASES = ("prompt", "question", "instruction", "input")
COMPLETION_ALIASES = ("completion", "answer", "response", "output")
MESSAGES_ALIASES = ("messages", "conversations", "conversation")
TEXT_ALIASES = ("text", "content", "sentence")


def detect_format(
    columns: Iterable[str],
    *,
    prompt_column: Optional[str] = None,
    completion_column: Optional[str] = None,
    messages_column: Optional[str] = None,
    text_column: Optional[str] = None,
) -> Format:
    """Pick the format from explicit column flags or, failing that, from well-known column names."""
    cols = list(columns)
    colset = set(cols)

    def need(flag: str, name: str) -> str:
        if name not in colset:
            raise DataError(f"{flag} {name}: no such column; the dataset has: {', '.join(cols) or '(none)'}")
        return name

    if messages_column:
        return Format("messages", messages=need("--messages-column", messages_column))
    if prompt_column or completion_column:
        if not (prompt_column and completion_column):
            given = "--prompt-column" if prompt_column else "--completion-column"
            missing = "--completion-column" if prompt_column else "--prompt-column"
            raise DataError(f"{given} needs {missing} too (or use --text-column for plain text)")
        return Format(
            "prompt-completion",
            prompt=need("--prompt-column", prompt_column),
            completion=need("--completion-column", completion_column),
        )
    if text_column:
        return Format("text", text=need("--text-column", text_column))
    for name in MESSAGES_ALIASES:
        if name in colset:
            return Format("messages", messages=name)
    prompt = next((c for c in PROMPT_ALIASES if c in colset), None)
    completion = next((c for c in COMPLETION_ALIASES if c in colset and c != prompt), None)
    if prompt and completion:
        return Format("prompt-completion", prompt=prompt, completion=completion)
    for name in TEXT_ALIASES:
        if name in colset:
            return Format("text", text=name)
    raise DataError(
        f"cannot tell the dataset's format from its columns ({', '.join(cols) or 'none'}); expected 'messages', "
        "'prompt'+'completion' or 'text', or name them with --messages-column, --prompt-column/--completion-column "
        "or --text-column"
    )


# --------------------------------------------------------------------------------------------------------------
# Tokenisation


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _example(prompt_ids: list[int], target_ids: list[int], max_length: int) -> Optional[dict]:
    return _finish(prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids, max_length)


def render_prompt(tokenizer, prompt: str) -> str:
    """The text a model is given for a prompt: the chat template with the generation prompt, when the tokenizer has
    one; the prompt itself otherwise. Training on prompt/completion rows and `l1ra generate` both use it."""
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt


def tokenize_prompt_completion(tokenizer, prompt: str, completion: str, max_length: int) -> Optional[dict]:
    """One prompt/completion pair; labels on the completion (and its end-of-turn tokens) only.

    With a chat template the pair becomes a user turn and an assistant turn; otherwise the texts are joined and the
    tokenizer's EOS token ends the completion. Returns None when truncation leaves no completion token.
    """
    if uses_chat_template(tokenizer):
        head = render_prompt(tokenizer, prompt)
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False
        )
        tail = full[len(head):] if full.startswith(head) else completion + (tokenizer.eos_token or "")
        return _example(_ids(tokenizer, head), _ids(tokenizer, tail), max_length)
    tail = completion + (tokenizer.eos_token or "")
    return _example(_ids(tokenizer, prompt, special=True), _ids(tokenizer, tail), max_length)


def tokenize_messages(tokenizer, messages: list[dict], max_length: int) -> Optional[dict]:
    """A chat; labels on the assistant turns only. Needs a tokenizer with a chat template."""
    if not uses_chat_template(tokenizer):
        raise DataError("the dataset holds chat messages but the model's tokenizer has no chat template")
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise DataError(f"a chat message must be {{'role': ..., 'content': ...}}, got {str(msg)[:80]}")
        upto = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if msg["role"] == "assistant":
            head = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True) if k else ""
            if not (head.startswith(done) and upto.startswith(head)):
                raise DataError("the chat template does not render a conversation turn by turn; use prompt/completion rows")
            ctx = _ids(tokenizer, head[len(done):])
            target = _ids(tokenizer, upto[len(head):])
            ids += ctx + target
            labels += [IGNORE_INDEX] * len(ctx) + target
        else:
            if not upto.startswith(done):
                raise DataError("the chat template does not render a conversation turn by turn; use prompt/completion rows")
            ctx = _ids(tokenizer, upto[len(done):])
            ids += ctx
            labels += [IGNORE_INDEX] * len(ctx)
        done = upto
    return _finish(ids, labels, max_length)


def _finish(ids: list[int], labels: list[int], max_length: int) -> Optional[dict]:
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels[1:]):
        return None  # nothing left to learn from after truncation (the first token is never predicted)
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


def tokenize_text(tokenizer, text: str, max_length: int) -> Optional[dict]:
    """Plain text (truncated to `max_length`, EOS appended); the loss is on every token but the first."""
    ids = _ids(tokenizer, text, special=True)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if len(ids) < 2:
        return None
    return _finish(ids, list(ids), max_length)


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def tokenize_rows(tokenizer, rows: Sequence[dict], fmt: Format, max_length: int) -> tuple[list[dict], int]:
    """Tokenise every usable row; returns `(examples, skipped)` where skipped rows were empty or left no loss token
    after truncation to `max_length`."""
    out, skipped = [], 0
    for row in rows:
        if fmt.kind == "prompt-completion":
            p, c = row.get(fmt.prompt), row.get(fmt.completion)
            ex = tokenize_prompt_completion(tokenizer, p, c, max_length) if _is_text(p) and _is_text(c) else None
        elif fmt.kind == "messages":
            msgs = row.get(fmt.messages)
            if isinstance(msgs, str):
                try:
                    msgs = json.loads(msgs)
                except json.JSONDecodeError:
                    msgs = None
            ok = isinstance(msgs, list) and any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs)
            ex = tokenize_messages(tokenizer, msgs, max_length) if ok else None
        else:
            t = row.get(fmt.text)
            ex = tokenize_text(tokenizer, t, max_length) if _is_text(t) else None
        if ex is None:
            skipped += 1
        else:
            out.append(ex)
    return out, skipped


def split_heldout(rows: Sequence[Any], fraction: float, seed: int, max_heldout: int = 500) -> tuple[list, list]:
    """`(train, heldout)`: a seeded shuffle, then `fraction` of the rows (at least 1, at most `max_heldout`) held out."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n = min(max_heldout, max(1, round(len(rows) * fraction))) if len(rows) > 1 else 0
    return [rows[i] for i in order[n:]], [rows[i] for i in order[:n]]



def sft_rows(tokenizer, rows: Sequence[dict], fmt: Format, max_length: int) -> tuple[list[dict], int]:
    """Rows for TRL's `SFTTrainer`: `(rows, skipped)`, skipped rows being empty (or, for chats, without a usable
    assistant turn after truncation to `max_length`).

    - prompt/completion -> `{"prompt": [user turn], "completion": [assistant turn]}` with a chat template (TRL renders
      the template and puts the loss on the completion tokens, end-of-turn included), `{"prompt", "completion"}`
      strings without one (TRL appends EOS);
    - text -> `{"text": str}` (loss on every token, EOS appended by TRL);
    - messages -> already tokenised `{"input_ids", "labels"}` (assistant turns only), which TRL takes as they are.
    """
    out, skipped = [], 0
    chat = uses_chat_template(tokenizer)
    for row in rows:
        item = None
        if fmt.kind == "prompt-completion":
            p, c = row.get(fmt.prompt), row.get(fmt.completion)
            if _is_text(p) and _is_text(c):
                item = ({"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}]}
                        if chat else {"prompt": p, "completion": c})
        elif fmt.kind == "text":
            t = row.get(fmt.text)
            item = {"text": t} if _is_text(t) else None
        else:
            examples, _ = tokenize_rows(tokenizer, [row], fmt, max_length)
            item = {"input_ids": examples[0]["input_ids"], "labels": examples[0]["labels"]} if examples else None
        if item is None:
            skipped += 1
        else:
            out.append(item)
    return out, skipped
