"""`--format gguf`: the llama.cpp LoRA file is what llama.cpp's own converter writes, and llama.cpp itself (through
llama-cpp-python) changes the next-token logits of the shipped SmolLM2 GGUF the way PEFT does on the same base.

The llama.cpp checks run only where they can: `llama_cpp` importable (llama-cpp-python, built from its PyPI sdist),
and for the converter comparison `LLAMA_CPP_SRC` pointing at a llama.cpp source tree (e.g. the `vendor/llama.cpp`
folder of the llama-cpp-python sdist)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from l1ra import export as ex
from l1ra.app import gguf_export as ge

from conftest import make_model

gguf = pytest.importorskip("gguf")


def read_gguf(path):
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    return meta, tensors, {t.name: t.tensor_type.name for t in reader.tensors}


def patterned_adapter(model, seed=0, scale=0.05, use_rslora=False, targets="all-linear"):
    """A PEFT adapter whose ranks and alphas differ per module (what an L1RA run leaves), with random B != 0."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    ranks = {n: 1 + (i * 5) % 8 for i, n in enumerate(names)}
    alphas = {n: 2.0 + (i * 3) % 11 for i, n in enumerate(names)}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas,
                        use_rslora=use_rslora, lora_dropout=0.0)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    return peft_model.eval()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    make_model("llama").save_pretrained(root / "base")
    patterned_adapter(make_model("llama"), use_rslora=True).save_pretrained(root / "adapter")
    return root


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


LLAMA_CPP_SRC = os.environ.get("LLAMA_CPP_SRC")


@pytest.mark.skipif(not LLAMA_CPP_SRC or not Path(LLAMA_CPP_SRC, "convert_lora_to_gguf.py").is_file(),
                    reason="set LLAMA_CPP_SRC to a llama.cpp source tree to compare with its convert_lora_to_gguf.py")
def test_same_file_as_llama_cpps_own_converter_on_the_uniform_adapter(tiny_run, tmp_path):
    """llama.cpp's converter keeps one alpha and raw B, so it is exact only on the uniform form; there our GGUF must
    hold the same tensors bit for bit (names, q/k permutation, dtype) and the same adapter keys."""
    uniform = ex.export_adapter(tiny_run / "adapter", tmp_path / "uniform", format="uniform")
    converted = tmp_path / "theirs.gguf"
    done = subprocess.run(
        [sys.executable, str(Path(LLAMA_CPP_SRC) / "convert_lora_to_gguf.py"), "--base", str(tiny_run / "base"),
         "--outfile", str(converted), str(uniform)], capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ours = ge.export_gguf(tiny_run / "adapter", tmp_path / "ours.gguf", base=tiny_run / "base", rank=16)
    meta_t, tensors_t, types_t = read_gguf(converted)
    meta_o, tensors_o, types_o = read_gguf(ours)
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
        assert meta_o[key] == meta_t[key], key
    assert types_o == types_t
    for name in tensors_t:
        np.testing.assert_array_equal(tensors_o[name], tensors_t[name], err_msg=name)


# ------------------------------------------------------------------------------------- llama.cpp itself, on SmolLM2

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed")
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Natalia sold clips to 48 of her friends"]


def llama_cpp_logits(gguf_file, tokens, lora=None):
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_file), lora_path=None if lora is None else str(lora), n_ctx=64,
                logits_all=True, verbose=False, n_threads=2, seed=0)
    llm.eval(tokens)
    scores = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    llm.close()
    return scores


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from l1ra.app.assets import AssetError, smollm2_dir, smollm2_gguf

    try:
        gguf_file, folder = smollm2_gguf(), smollm2_dir()
    except AssetError as err:
        pytest.skip(str(err))
    root = tmp_path_factory.mktemp("smollm2")
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    adapter = patterned_adapter(base, scale=0.03)
    adapter.save_pretrained(root / "adapter")
    batches = [tokenizer(p)["input_ids"] for p in PROMPTS]
    with torch.no_grad():
        with_lora = [adapter(input_ids=torch.tensor([ids])).logits[0].double().numpy() for ids in batches]
        with adapter.disable_adapter():
            without = [adapter(input_ids=torch.tensor([ids])).logits[0].double().numpy() for ids in batches]
    return dict(root=root, gguf=gguf_file, folder=folder, tokens=batches, peft=with_lora, base=without)


def deviation(smollm2, lora_file):
    """max |Δ_llama.cpp - Δ_PEFT| over all positions and the vocabulary, and max |Δ_PEFT|, where Δ is the change of
    the logits the adapter causes (each engine against its own base: the GGUF base is Q4_1, PEFT's is dequantized)."""
    worst, size, base_gap = 0.0, 0.0, 0.0
    for ids, peft_lora, peft_base in zip(smollm2["tokens"], smollm2["peft"], smollm2["base"]):
        cpp_base = llama_cpp_logits(smollm2["gguf"], ids)
        cpp_lora = llama_cpp_logits(smollm2["gguf"], ids, lora_file)
        worst = max(worst, np.abs((cpp_lora - cpp_base) - (peft_lora - peft_base)).max())
        size = max(size, np.abs(peft_lora - peft_base).max())
        base_gap = max(base_gap, np.abs(cpp_base - peft_base).max())
    return worst, size, base_gap


@needs_llama_cpp
def test_llama_cpp_changes_the_logits_the_way_peft_does(smollm2, tmp_path):
    ours = ge.export_gguf(smollm2["root"] / "adapter", tmp_path / "ours.gguf", base=smollm2["gguf"])
    worst, size, base_gap = deviation(smollm2, ours)
    # What llama.cpp's converter does with this adapter: raw B and the file's one alpha (every module scaled by
    # lora_alpha / r_i): per-module alphas are lost.
    adapter = ex.read_adapter(smollm2["root"] / "adapter")
    naive = ex.LoraAdapter(adapter.config, {n: ex.LoraModule(m.a, m.b, 1.0) for n, m in adapter.modules.items()})
    info = ge.base_info(smollm2["gguf"])
    naive_file = ge.write_gguf(naive, info, tmp_path / "naive.gguf", alpha=adapter.config["lora_alpha"])
    naive_worst, _, _ = deviation(smollm2, naive_file)
    print(f"max|Δlogits| PEFT {size:.3f}; llama.cpp vs PEFT: ours {worst:.4f}, converter-style {naive_worst:.3f}; "
          f"bases differ by {base_gap:.3f}")
    assert size > 1.0, "the adapter must change the logits visibly"
    assert worst < 0.05 * size, (worst, size)
    assert naive_worst > 4 * worst  # the tolerance tells the right export from the per-module-alpha loss

