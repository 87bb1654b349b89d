"""`--format gguf` in process: the llama.cpp LoRA file's names, folded scalings and q/k permutation, Gemma 3 names and
the architectures refused. llama.cpp itself and its own converter: tests/integration/test_llamacpp.py."""

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from l1ra import export as ex
from l1ra.app.deploy import gguf_export as ge

from conftest import make_model
from helpers import patterned_adapter, read_gguf, save_patterned_run

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return save_patterned_run(tmp_path_factory.mktemp("gguf"))


def test_gguf_metadata_names_and_folded_scalings(tiny_run, tmp_path):
    out = ge.export_gguf(tiny_run / "adapter", tmp_path / "a.gguf", base=tiny_run / "base")
    meta, tensors, types = read_gguf(out)
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "adapter"
    assert meta["adapter.type"] == "lora" and meta["adapter.lora.alpha"] == 0.0  # ranks differ: scale 1 needs 0
    assert set(types.values()) == {"F32"}
    adapter = ex.read_adapter(tiny_run / "adapter")
    assert len(tensors) == 2 * len(adapter.modules)
    cfg = json.loads((tiny_run / "base" / "config.json").read_text())
    for name, m in adapter.modules.items():
        layer, kind = name.split(".")[2], name.split(".")[-1]
        short = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[kind]
        a, b = tensors[f"blk.{layer}.{short}.weight.lora_a"], tensors[f"blk.{layer}.{short}.weight.lora_b"]
        np.testing.assert_array_equal(a, m.a.numpy())
        want = m.scaling * m.b
        if kind in ("q_proj", "k_proj"):  # rope rows: llama.cpp's own layout for Llama q/k
            heads = cfg["num_attention_heads"] if kind == "q_proj" else cfg["num_key_value_heads"]
            want = ge.rope_permute_rows(want, heads)
            assert not torch.equal(want, m.scaling * m.b)
        np.testing.assert_allclose(b, want.numpy(), rtol=1e-6, atol=0)
    # with one rank everywhere the alpha is that rank (llama.cpp: alpha / rank = 1)
    meta, _, _ = read_gguf(ge.export_gguf(tiny_run / "adapter", tmp_path / "u.gguf", base=tiny_run / "base", rank=8))
    assert meta["adapter.lora.alpha"] == 8.0

def test_rope_permutation_interleaves_the_two_halves_of_each_head():
    rows = torch.arange(8.0)[:, None]  # 2 heads of dim 4: [0 1 | 2 3], [4 5 | 6 7]
    assert ge.rope_permute_rows(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]

def test_gemma3_names_without_permutation_and_other_architectures_refused(tmp_path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    Gemma3ForCausalLM(cfg).save_pretrained(tmp_path / "gemma")
    patterned_adapter(Gemma3ForCausalLM(cfg)).save_pretrained(tmp_path / "gemma_adapter")
    meta, tensors, _ = read_gguf(ge.export_gguf(tmp_path / "gemma_adapter", tmp_path / "g.gguf",
                                                base=tmp_path / "gemma"))
    assert meta["general.architecture"] == "gemma3"
    adapter = ex.read_adapter(tmp_path / "gemma_adapter")
    m = adapter.modules["model.layers.1.self_attn.q_proj"]
    np.testing.assert_allclose(tensors["blk.1.attn_q.weight.lora_b"], (m.scaling * m.b).numpy(), rtol=1e-6)

    from conftest import ARCH_CASES

    gpt2 = make_model("gpt2")
    gpt2.save_pretrained(tmp_path / "gpt2")
    get_peft_model(gpt2, LoraConfig(target_modules=ARCH_CASES["gpt2"]["target_modules"])).save_pretrained(
        tmp_path / "gpt2_adapter")
    with pytest.raises(ex.ExportError, match="'GPT2LMHeadModel' is not supported.*LlamaForCausalLM.*Gemma3ForCausalLM"):
        ge.export_gguf(tmp_path / "gpt2_adapter", tmp_path / "x.gguf", base=tmp_path / "gpt2")
    with pytest.raises(ex.ExportError, match="pass base= \\(--base\\)"):
        ge.export_gguf(tmp_path / "gpt2_adapter", tmp_path / "x.gguf")
