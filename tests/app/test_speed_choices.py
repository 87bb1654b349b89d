"""The per-machine speed decisions of `l1ra train` (batch layout, precision) and the base-score cache."""

from __future__ import annotations

import pytest
import torch

from l1ra.app.devices import DevicePlan, packs_batches, plan_device
from l1ra.app.train import data
from helpers import make_tokenizer
from test_train_recipe import PC, _lm_trainer, _tiny_llama


@pytest.mark.parametrize("device,attn,packs", [
    ("cpu", "sdpa", False),  # a packed row is one long sequence for SDPA: measured slower than padding
    ("cpu", "eager", False),
    ("cpu", None, False),
    ("mps", "sdpa", False),
    ("cuda", "sdpa", False),  # SDPA gets a block mask: no varlen kernel, attention over the whole row
    ("cuda", "eager", False),
    ("cuda", "flash_attention_2", True),  # varlen flash-attention: each example attends within itself
    ("cuda", "flash_attention_3", True),
    ("cuda", "kernels-community/flash-attn", True),
])
def test_batches_are_packed_only_where_attention_has_a_varlen_kernel(device, attn, packs):
    assert packs_batches(device, attn) is packs


@pytest.mark.parametrize("device,flash,attn", [
    ("cuda", True, "flash_attention_2"), ("cuda", False, None), ("cpu", True, None), ("cpu", False, None),
    ("mps", True, None),
])
def test_flash_attention_is_chosen_on_cuda_where_installed_and_then_batches_are_packed(device, flash, attn):
    from l1ra.app.devices import attention_for

    assert attention_for(device, flash) == attn
    assert packs_batches(device, attention_for(device, flash)) is (attn is not None)


def _rows(n=9):
    tok = make_tokenizer()
    rows = [{"prompt": f"What is {i} plus {i * 7}?" + " Think." * (i % 4), "completion": f"It is {8 * i}."}
            for i in range(n)]
    sft, _ = data.sft_rows(tok, rows, PC, 96)
    return tok, sft


def test_a_cpu_run_pads_its_batches_and_evaluates_longest_first(tmp_path):
    tok, sft = _rows()
    trainer = _lm_trainer(tmp_path, _tiny_llama(len(tok)), tok, sft, sft, 96)
    assert trainer.data_collator.padding_free is False  # the model could pack: the CPU's attention makes it slower
    lengths = [len(ids) for ids in trainer.eval_dataset["input_ids"]]
    assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) > 1
    batches = list(trainer.get_eval_dataloader())
    assert "attention_mask" in batches[0]  # padded rows, not one packed row
    padded = sum(b["input_ids"].numel() for b in batches)
    assert padded < len(batches) * 4 * max(lengths)  # sorting keeps each batch near its own longest row


def test_the_heldout_score_does_not_depend_on_the_order_or_the_layout(tmp_path):
    from l1ra.app.train.trainers import from_trainer_metrics

    tok, sft = _rows()
    model = _tiny_llama(len(tok))
    scores = [from_trainer_metrics(_lm_trainer(tmp_path / str(pf), model, tok, sft, sft, 96,
                                               padding_free=pf).evaluate()) for pf in (False, True)]
    assert scores[0]["tokens"] == scores[1]["tokens"]
    assert scores[0]["loss"] == pytest.approx(scores[1]["loss"], rel=1e-5)


def test_user_data_runs_get_the_devices_own_precision():
    """`l1ra train --dataset FILE` (or --model) on a CPU with native bf16 trains in bf16 like the shipped run."""
    from l1ra.app.train.options import TrainOptions, resolve_preset

    for opts, given in ((TrainOptions(dataset="qa.jsonl"), {"dataset"}), (TrainOptions(model="/m"), {"model"}),
                        (TrainOptions(), set())):
        resolved = resolve_preset(opts, given)
        assert resolved.bf16 is None  # not decided by the preset
        plan = plan_device(cuda=False, mps=False, cuda_bf16=False, bf16=resolved.bf16, cpu_bf16_native=True)
        assert plan == DevicePlan("cpu", bf16=True)
        assert plan_device(cuda=False, mps=False, cuda_bf16=False, bf16=resolved.bf16,
                           cpu_bf16_native=False) == DevicePlan("cpu")
    forced = resolve_preset(TrainOptions(dataset="qa.jsonl", bf16=False), {"dataset", "bf16"})
    assert plan_device(cuda=False, mps=False, cuda_bf16=False, bf16=forced.bf16, cpu_bf16_native=True) == DevicePlan("cpu")


# ---- the base model's score, once per model, data and precision ---------------------------------------------------


class _Procs:
    main, world = True, 1


def _cached_trainer(tmp_path, monkeypatch, sft, tok, model_dir):
    from peft import LoraConfig, get_peft_model

    monkeypatch.setenv("L1RA_CACHE", str(tmp_path / "cache"))
    model = get_peft_model(_tiny_llama(len(tok)), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(model_dir)  # a folder whose files key the cache
    return model, _lm_trainer(tmp_path / "out", model, tok, sft, sft, 96)


def test_the_base_score_is_computed_once_and_read_back(tmp_path, monkeypatch):
    from l1ra.app.train.base_score import base_score_key, score_base

    tok, sft = _rows()
    model, trainer = _cached_trainer(tmp_path, monkeypatch, sft, tok, tmp_path / "model")
    key = base_score_key("causal-lm", str(tmp_path / "model"), trainer.eval_dataset, "cpu, fp32")
    first, cached = score_base(trainer, model, key, _Procs(), lambda m: None)
    assert not cached and trainer.eval_seconds > 0
    spent = trainer.eval_seconds
    again, cached = score_base(trainer, model, key, _Procs(), lambda m: None)
    assert cached and again == pytest.approx(first) and trainer.eval_seconds == spent  # no evaluation ran
    assert (tmp_path / "cache" / "base-scores" / f"{key}.json").is_file()


def test_the_base_score_key_follows_model_data_and_precision(tmp_path, monkeypatch):
    from l1ra.app.train.base_score import base_score_key

    tok, sft = _rows()
    _, trainer = _cached_trainer(tmp_path, monkeypatch, sft, tok, tmp_path / "model")
    held = trainer.eval_dataset
    key = base_score_key("causal-lm", str(tmp_path / "model"), held, "cpu, fp32")
    assert key == base_score_key("causal-lm", str(tmp_path / "model"), held, "cpu, fp32")
    assert key != base_score_key("causal-lm", str(tmp_path / "model"), held, "cpu, bf16")
    assert key != base_score_key("causal-lm", str(tmp_path / "model"), held.select(range(len(held) - 1)), "cpu, fp32")
    changed = held.map(lambda row, i: {"input_ids": row["input_ids"][:-1] + [7] if i == 0 else row["input_ids"]},
                       with_indices=True)
    assert key != base_score_key("causal-lm", str(tmp_path / "model"), changed, "cpu, fp32")
    weights = next((tmp_path / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b"\0")  # a re-converted or edited model
    assert key != base_score_key("causal-lm", str(tmp_path / "model"), held, "cpu, fp32")


def test_an_unreadable_cache_entry_is_scored_again(tmp_path, monkeypatch):
    from l1ra.app.train.base_score import base_score_key, cache_file, score_base

    tok, sft = _rows()
    model, trainer = _cached_trainer(tmp_path, monkeypatch, sft, tok, tmp_path / "model")
    key = base_score_key("causal-lm", str(tmp_path / "model"), trainer.eval_dataset, "cpu, fp32")
    cache_file(key).parent.mkdir(parents=True)
    cache_file(key).write_text("{truncated")
    score, cached = score_base(trainer, model, key, _Procs(), lambda m: None)
    assert not cached and torch.isfinite(torch.tensor(score["loss"]))


def test_the_summary_gives_evaluation_and_memory_figures():
    from l1ra.app.train.report import summary_text

    metrics = {"status": "finished", "base": {"loss": 1.5}, "tuned": {"loss": 1.2}, "wall_seconds": 600,
               "tokens_per_second": 120.0, "eval_passes": 2, "eval_seconds": 95.0, "eval_tokens_per_second": 310.4,
               "base_from_cache": True, "peak_rss_mb": 5300}
    text = summary_text(metrics, None)
    assert "held-out evaluation 2 x, 95 s, 310 tokens/s, base score from the cache" in text
    assert "peak memory 5.2 GiB" in text


def test_peak_memory_reads_this_process():
    from l1ra.app.memory import peak_memory

    figures = peak_memory("cpu")
    assert set(figures) == {"peak_rss_mb"} and figures["peak_rss_mb"] > 50  # torch alone is more than 50 MiB


def test_peak_memory_of_a_started_process_is_its_own_not_its_parents():
    # Linux carries getrusage's ru_maxrss across fork and exec: a benchmark parent holding several models made every
    # child report the parent's peak (identical figures for every method). VmHWM starts afresh at exec.
    import subprocess
    import sys

    from l1ra.app.memory import peak_rss_mb

    held = torch.ones(128 * 2**20)  # 512 MiB written in this process
    parent_peak = peak_rss_mb()
    code = "from l1ra.app.memory import peak_memory; print(peak_memory('cpu')['peak_rss_mb'])"
    child_peak = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout.split()[-1])
    del held
    assert parent_peak > 600 and child_peak < parent_peak - 400, (parent_peak, child_peak)
