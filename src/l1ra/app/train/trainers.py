"""The Trainers of `l1ra train`: TRL's `SFTTrainer` for causal LMs, `transformers.Trainer` for classifiers, with one
loss and one held-out evaluation each.

Both run on whatever device and precision `TrainingArguments` say (placement, autocast, fp16 scaling and gathering
across processes are the Trainer's). What is ours:

- the causal-LM loss projects through the LM head only the positions whose next token carries loss (the model's
  `logits_to_keep`), so no `(batch, length, vocabulary)` logits are built for prompt or padding tokens;
- the held-out metric is the token-weighted mean over the answer tokens (and accuracy for a classifier): the
  prediction step returns per-example `[loss sum, loss tokens, correct]` rows that the Trainer gathers across
  processes, and `compute_metrics` reduces them.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import DataCollatorWithPadding, Trainer
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from ..devices import packs_batches
from .data import IGNORE_INDEX


# ------------------------------------------------------------------------------------------------------------
# Collators: one per data kind


class LMCollator(DataCollatorForLanguageModeling):
    """TRL's collator, plus where the loss is (`loss_index`, computed here on the host from the labels), so that the
    loss on the device needs no host sync: no `nonzero`, boolean-mask indexing or `.item()` per micro-batch."""

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        batch.update(loss_index(batch["labels"], batch.get("position_ids"), "attention_mask" not in batch))
        return batch


def lm_collator(pad_token_id: int, padding_free: bool) -> LMCollator:
    """Causal LM examples (`input_ids`, `labels`): TRL's collator, padded per batch or flattened into one row with
    `position_ids` (padding-free; the attention is kept within each example by the model's packed-sequence mask)."""
    return LMCollator(pad_token_id=pad_token_id, padding_free=padding_free)


def classifier_collator(tokenizer) -> DataCollatorWithPadding:
    return DataCollatorWithPadding(tokenizer)


def supports_padding_free(model) -> bool:
    """Padding-free batches need a model whose attention builds its mask from `position_ids` (transformers'
    attention-interface models: Llama, Qwen, Gemma, GPT-2, ... ; checked in tests/app/test_train_recipe.py)."""
    base = _base_model(model)
    generative = callable(getattr(base, "can_generate", None)) and base.can_generate()
    return generative and bool(getattr(base, "_supports_attention_backend", False)) and _accepts(base, "position_ids")


def _base_model(model):
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------------------
# Loss and per-example statistics


LOSS_KEYS = ("l1ra_keep", "l1ra_tokens", "l1ra_examples")


def loss_index(labels: torch.Tensor, position_ids: Optional[torch.Tensor] = None, unmasked: bool = True) -> dict:
    """Where the loss is in a batch: computed by the collator on the host (a host sync per call on a device).

    `l1ra_keep` (K,): the positions whose next token carries loss in some row (label != -100, shifted by one);
    `l1ra_tokens` (4, T), one column per loss token in row-major order (as a boolean mask picks them): its index in
    the (rows, K) logits of the sparse head, its index in the (rows, length) full logits, its target and its example;
    `l1ra_examples`: the number of examples. A padding-free batch (`unmasked`: no attention mask, one row with
    `position_ids`) holds several examples, each starting where its position id is 0.
    """
    targets = labels[:, 1:]
    carry = targets != IGNORE_INDEX
    keep = carry.any(0).nonzero().squeeze(1)
    rows, cols = carry.nonzero(as_tuple=True)
    kept_col = torch.zeros(targets.size(1), dtype=torch.long, device=labels.device)
    kept_col[keep] = torch.arange(keep.numel(), device=labels.device)
    n_rows, length = labels.shape
    if n_rows == 1 and position_ids is not None and unmasked:
        starts = (position_ids[0] == 0).long()
        example, n_examples = (starts.cumsum(0)[:-1] - 1)[cols], int(starts.sum())
    else:
        example, n_examples = rows, n_rows
    tokens = torch.stack([rows * keep.numel() + kept_col[cols], rows * length + cols, targets[rows, cols], example])
    return {"l1ra_keep": keep, "l1ra_tokens": tokens, "l1ra_examples": n_examples}


def lm_token_losses(model, inputs: dict, sparse_head: bool = True):
    """`(per_token_loss, example_index, n_examples)` for the tokens that carry loss (label != -100, shifted by one).

    With `sparse_head` the LM head runs only on the positions whose next token carries loss (`logits_to_keep` with
    their indices): for a padded batch the union over its rows, for a padding-free one (one row) exactly those. The
    indices come from the collator (`LMCollator`), so this makes no host sync; other batches get them computed here.
    """
    index = inputs if "l1ra_tokens" in inputs else loss_index(
        inputs["labels"], inputs.get("position_ids"), "attention_mask" not in inputs
    )
    feed = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels", *LOSS_KEYS)}
    feed["use_cache"] = False  # a cache also turns off the packed-sequence mask of padding-free batches
    at_kept, at_full, targets, example = index["l1ra_tokens"]
    if sparse_head:
        logits, at = model(**feed, logits_to_keep=index["l1ra_keep"]).logits, at_kept  # (batch, kept, vocab)
    else:
        logits, at = model(**feed).logits, at_full  # (batch, length, vocab)
    picked = logits.flatten(0, 1).index_select(0, at)  # (loss tokens, vocab); the same rows a boolean mask picks
    loss = F.cross_entropy(picked.float(), targets, reduction="none")
    return loss, example, index["l1ra_examples"]


def token_stats(loss: torch.Tensor, example: torch.Tensor, n_examples: int) -> torch.Tensor:
    """Per-example rows `[loss sum, loss tokens, 0]`."""
    stats = torch.zeros(n_examples, 3, device=loss.device, dtype=torch.float32)
    stats[:, 0].index_add_(0, example, loss.detach().float())
    stats[:, 1].index_add_(0, example, torch.ones_like(loss, dtype=torch.float32))
    return stats


def heldout_metrics(stats, task: str) -> dict:
    """Reduce gathered per-example rows to the run's held-out metrics."""
    import numpy as np

    stats = np.asarray(stats, dtype=np.float64).reshape(-1, 3)
    count = float(stats[:, 1].sum())
    loss = float(stats[:, 0].sum()) / max(count, 1.0)
    if task == "classification":
        return {"heldout_loss": loss, "accuracy": float(stats[:, 2].sum()) / max(count, 1.0)}
    return {"heldout_loss": loss, "perplexity": ppl(loss), "tokens": int(count)}


def ppl(loss: Optional[float]) -> Optional[float]:
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(loss, 50.0))


def from_trainer_metrics(metrics: dict, prefix: str = "eval") -> dict:
    """`trainer.evaluate()`'s dict -> the run's `{"loss", "perplexity", "tokens"}` / `{"loss", "accuracy"}`."""
    out = {"loss": metrics[f"{prefix}_heldout_loss"]}
    for key in ("perplexity", "tokens", "accuracy"):
        if f"{prefix}_{key}" in metrics:
            out[key] = metrics[f"{prefix}_{key}"]
    if "tokens" in out:
        out["tokens"] = int(out["tokens"])
    return out


class _HeldOut:
    """Shared by both trainers: the evaluation step, its timing and the count of training tokens."""

    task = "causal-lm"

    def _setup_heldout(self):
        self.eval_seconds, self.eval_passes = 0.0, 0
        self._train_tokens = None
        self.compute_metrics = lambda pred: heldout_metrics(pred.predictions, self.task)

    def train_tokens(self) -> int:
        """Non-padding tokens trained on so far, summed over all processes (the global batch); under DDP every
        process must call it (an all-reduce)."""
        # a device tensor (summed attention masks) or a host int (inputs without a mask)
        count = torch.as_tensor(self._train_tokens or 0).to(device=self.args.device, dtype=torch.long)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return int(count)

    def _count_tokens(self, inputs) -> None:
        # non-padding tokens fed to training; kept on the device (no host sync per step)
        mask = inputs.get("attention_mask")
        n = mask.sum().detach() if mask is not None else inputs["input_ids"].numel()  # a host int: no copy to the device
        self._train_tokens = n if self._train_tokens is None else self._train_tokens + n

    def evaluate(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.eval_seconds += time.perf_counter() - t0
            self.eval_passes += 1

    def eval_figures(self) -> dict:
        """The held-out evaluations so far: passes, seconds and tokens (prompt and answer) per second."""
        tokens = sum(len(ids) for ids in self.eval_dataset["input_ids"]) * self.eval_passes
        return {"eval_passes": self.eval_passes, "eval_seconds": round(self.eval_seconds, 1),
                "eval_tokens_per_second": round(tokens / self.eval_seconds, 1) if self.eval_seconds > 0 else None}

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            stats = self._eval_stats(model, inputs)
        # no Trainer "eval_loss" (a mean of batch means): the metric is reduced from the per-example rows
        return None, stats, torch.zeros(stats.size(0), device=stats.device)


class LMTrainer(_HeldOut, SFTTrainer):
    """SFTTrainer whose loss uses the sparse LM head (see the module docstring)."""

    task = "causal-lm"

    def __init__(self, *args, sparse_head: Optional[bool] = None, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
        super().__init__(*args, **kwargs)
        # SFTTrainer casts every trainable parameter of a quantized model to bf16 (QLoRA's recommendation). Undo it:
        # bf16 gates lose the L1's small proximal steps (l1ra refuses them), and fp32 adapters under the plan's
        # autocast are PEFT's own default for k-bit bases.
        for name, p in self.model.named_parameters():
            if name in dtypes and p.dtype != dtypes[name]:
                p.data = p.data.to(dtypes[name])
        self._setup_heldout()
        base = _base_model(self.model)
        # nn.DataParallel (several GPUs, no torchrun) would split the logits_to_keep indices between its replicas
        auto = _accepts(base, "logits_to_keep") and self.args.n_gpu <= 1
        self.sparse_head = auto if sparse_head is None else sparse_head
        # our loss is divided by the tokens of the whole accumulated batch, so the Trainer must not rescale it
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model.training:
            self._count_tokens(inputs)
        loss, _, _ = lm_token_losses(model, inputs, self.sparse_head)
        denom = num_items_in_batch if num_items_in_batch is not None else loss.numel()
        total = loss.sum() / (denom.clamp(min=1) if torch.is_tensor(denom) else max(denom, 1))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            total = total * self.accelerator.num_processes  # DDP averages the gradients across processes
        return (total, None) if return_outputs else total

    def _eval_stats(self, model, inputs):
        return token_stats(*lm_token_losses(model, inputs, self.sparse_head))

    def create_model_card(self, *args, **kwargs):
        """No TRL model card (README.md) in the output folder: the run writes its own summary and the adapter folder
        gets PEFT's card."""


class ClassifierTrainer(_HeldOut, Trainer):
    task = "classification"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_heldout()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model.training:
            self._count_tokens(inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _eval_stats(self, model, inputs):
        feed = {k: v for k, v in inputs.items() if k != "labels"}
        logits = model(**feed).logits.float()
        labels = inputs["labels"]
        loss = F.cross_entropy(logits, labels, reduction="none")
        correct = (logits.argmax(-1) == labels).float()
        return torch.stack([loss, torch.ones_like(loss), correct], dim=1)


# ------------------------------------------------------------------------------------------------------------
# The Trainer of a run


def build_trainer(task: str, model, tokenizer, train_rows: list[dict], held_rows: list[dict], args_kwargs: dict,
                  optimizer, callbacks, max_length: int, padding_free: Optional[bool] = None,
                  sparse_head: Optional[bool] = None):
    """The Trainer of a run: `LMTrainer` (TRL's SFTTrainer: completion-only loss, sparse LM head, padding-free
    batches where the model supports them) or `ClassifierTrainer`; both evaluate the held-out rows."""
    import datasets
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    train_ds, held_ds = datasets.Dataset.from_list(train_rows), datasets.Dataset.from_list(held_rows)
    if task == "classification":
        trainer = ClassifierTrainer(model=model, args=TrainingArguments(**args_kwargs), train_dataset=train_ds,
                                    eval_dataset=held_ds, data_collator=classifier_collator(tokenizer),
                                    optimizers=(optimizer, None), callbacks=callbacks)
    else:
        from trl import SFTConfig

        # SFTConfig's own defaults (gradient checkpointing, bf16 on) are overridden: the run's plan decides
        ckpt_field = ("activation_checkpointing" if "activation_checkpointing" in SFTConfig.__dataclass_fields__
                      else "gradient_checkpointing")  # renamed in transformers 5.x
        cfg = SFTConfig(**args_kwargs, max_length=max_length, completion_only_loss=True, packing=False,
                        padding_free=False, dataset_num_proc=None, shuffle_dataset=False, **{ckpt_field: False})
        if padding_free is None:  # where the attention kernel makes packing pay (devices.packs_batches)
            padding_free = supports_padding_free(model) and packs_batches(
                cfg.device.type, getattr(model.config, "_attn_implementation", None))
        progress = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # TRL tokenises with Dataset.map; its bars would flood the log
        try:
            trainer = LMTrainer(model=model, args=cfg, train_dataset=train_ds, eval_dataset=held_ds,
                                processing_class=tokenizer,
                                data_collator=lm_collator(tokenizer.pad_token_id, padding_free),
                                optimizers=(optimizer, None), callbacks=callbacks, sparse_head=sparse_head)
        finally:
            if progress:
                datasets.enable_progress_bars()
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    trainer.eval_dataset = longest_first(trainer.eval_dataset)
    return trainer


def longest_first(dataset):
    """The held-out rows sorted by length, longest first: padded evaluation batches then hold rows of about the same
    length (little padding), and a batch too big for the device fails at once. The metrics are sums over examples, so
    the order does not change them."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return dataset.select(sorted(range(len(lengths)), key=lambda i: -lengths[i]))
