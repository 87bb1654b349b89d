"""The L1 reach of a run and the L1 strength from the run's length (issue 24, item 4)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import Trainer, TrainingArguments, get_cosine_schedule_with_warmup

import l1ra
from l1ra import L1RAConfig
from l1ra.reach import (
    DEFAULT_REACH, l1_reach, lambda_for_run, lr_factors_from, unreachable_message, warmup_cosine_factors,
)

from conftest import make_batch, make_model


def _config(**kw):
    values = dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", l1ra_lambda=0.5, eta_c=0.1)
    values.update(kw)
    return L1RAConfig(**values)


def test_the_factors_are_transformers_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=30)
    assert lr_factors_from(sched, 30) == pytest.approx(warmup_cosine_factors(30, 3))
    assert lr_factors_from(object(), 30) is None


def test_issue_24s_30_step_run_cannot_prune_by_l1_and_says_what_to_set():
    """`l1ra train --max-steps 30` (lambda 0.5, eta_c 0.1, warm-up + cosine): a gate moves by 0.75 at most."""
    cfg, factors = _config(), warmup_cosine_factors(30, 3)
    assert l1_reach(cfg, 30, factors) == pytest.approx(0.75, abs=1e-9)
    message = unreachable_message(cfg, 30, factors)
    assert "at most 0.75" in message and "raise l1ra_lambda to 0.667 or more" in message
    flags = unreachable_message(cfg, 30, factors, describe=lambda name: "--" + name.replace("_", "-"))
    assert "--l1ra-lambda 0.5" in flags
    assert unreachable_message(cfg, 80, warmup_cosine_factors(80, 8)) is None  # reach 2.0
    assert unreachable_message(_config(reassign=False), 30, factors) is None  # prune-only runs move nothing anyway


def test_lambda_for_run_gives_the_reach_it_was_asked_for():
    for steps, start in ((30, 0), (500, 125), (3000, 0)):
        factors = warmup_cosine_factors(steps, round(0.1 * steps))
        lam = lambda_for_run(steps, eta_c=0.1, l1_start_step=start, lr_factors=factors)
        assert l1_reach(_config(l1ra_lambda=lam, l1_start=start), steps, factors) == pytest.approx(DEFAULT_REACH)
    # the sentiment-tuned setting (lambda 0.1, eta_c 0.1, L1 from 25% of 500 steps) is the default reach
    assert lambda_for_run(500, eta_c=0.1, l1_start_step=125, lr_factors=warmup_cosine_factors(500, 50)) == pytest.approx(
        0.1, rel=0.02)
    with pytest.raises(ValueError, match="L1 phase is empty"):
        lambda_for_run(10, eta_c=0.1, l1_start_step=10)


class _Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        return {k: v[0] for k, v in make_batch("llama", batch=1, seed=i).items()}


@pytest.mark.parametrize("lam,warns", [(0.5, True), (5.0, False)])
def test_the_callback_warns_at_train_begin_when_the_schedule_cannot_move_rank(tmp_path, lam, warns):
    model = l1ra.get_l1ra_model(make_model("llama"), _config(l1ra_lambda=lam, update_every=5))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=2, learning_rate=1e-3,
                             warmup_steps=1, lr_scheduler_type="cosine", report_to=[], save_strategy="no",
                             use_cpu=True, logging_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[l1ra.L1RACallback()],
                      optimizers=(l1ra.create_optimizer(model, lr=1e-3), None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    found = [w for w in caught if "prunes no rank" in str(w.message)]
    assert bool(found) == warns, [str(w.message) for w in caught]
