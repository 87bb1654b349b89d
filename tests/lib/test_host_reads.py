"""The per-step library work reads no tensor value back to the host (a host sync per tensor on a GPU; issue 10)."""

from __future__ import annotations

import torch

import l1ra

from conftest import make_batch
from helpers import build, train_steps


def test_a_step_without_reallocation_reads_no_tensor_back_to_the_host(monkeypatch):
    model, batch = build("llama", update_every=3), make_batch("llama")
    opt = train_steps(model, batch, 1)  # first step: one-time setup checks
    model(**batch).loss.backward()
    opt.step()
    reads = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    event = l1ra.after_optimizer_step(model, opt)  # step 2: the L1 step, no reallocation
    monkeypatch.undo()
    assert event is None and reads == []
