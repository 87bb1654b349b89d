"""Causal-LM batches and the score of every causal-LM task: the mean loss over the answer (labelled) tokens."""

from __future__ import annotations

import math

import torch

from ..train.data import IGNORE_INDEX


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()


def answer_loss(model, examples: list, pad_id: int, device="cpu", amp_dtype=None, batch_size: int = 8) -> dict:
    """Mean next-token loss over the labelled (answer) tokens, computed from the logits: AdaLoRA adds its
    orthogonality penalty to `outputs.loss`, so the model's own loss is not comparable between methods."""
    device = torch.device(device)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = to_device(pad(examples[i : i + batch_size], pad_id), device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        mask = labels != IGNORE_INDEX
        nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        total += float(nll[mask].sum())
        count += int(mask.sum())
    model.train()
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "n_eval": len(examples), "answer_tokens": count}


def pad(rows: list, pad_id: int) -> dict:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
