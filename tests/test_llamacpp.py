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
from l1ra.app.deploy import gguf_export as ge

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


@pytest.mark.llama_cpp
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
needs_converter = pytest.mark.skipif(
    not LLAMA_CPP_SRC or not Path(LLAMA_CPP_SRC, "convert_hf_to_gguf.py").is_file(),
    reason="set LLAMA_CPP_SRC to a llama.cpp source tree to convert the base to an f32 GGUF",
)
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
    """SmolLM2 (the shipped Q4_1 GGUF, dequantized by transformers) with a patterned adapter, and PEFT's logits with
    and without it on every prompt position; plus the files llama.cpp needs (ours and a converter-style GGUF)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from l1ra.app.assets import AssetError, smollm2_dir, smollm2_gguf

    try:
        gguf_file, folder = smollm2_gguf(), smollm2_dir()
    except AssetError as err:
        pytest.skip(str(err))
    root = tmp_path_factory.mktemp("smollm2")
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    peft_model = patterned_adapter(base, scale=0.05)
    peft_model.save_pretrained(root / "adapter")
    batches = [tokenizer(p)["input_ids"] for p in PROMPTS]
    with torch.no_grad():
        with_lora = [peft_model(input_ids=torch.tensor([ids])).logits[0].double().numpy() for ids in batches]
        with peft_model.disable_adapter():
            without = [peft_model(input_ids=torch.tensor([ids])).logits[0].double().numpy() for ids in batches]
    ours = ge.export_gguf(root / "adapter", root / "ours.gguf", base=gguf_file)
    # What llama.cpp's own converter makes of this adapter: raw B and the file's one alpha (every module scaled by
    # lora_alpha / r_i): the per-module alphas are lost.
    adapter = ex.read_adapter(root / "adapter")
    raw = ex.LoraAdapter(adapter.config, {n: ex.LoraModule(m.a, m.b, 1.0) for n, m in adapter.modules.items()})
    converter_style = ge.write_gguf(raw, ge.base_info(gguf_file), root / "converter_style.gguf",
                                    alpha=adapter.config["lora_alpha"])
    return dict(root=root, gguf=gguf_file, folder=folder, tokens=batches, peft=with_lora, base=without, ours=ours,
                converter_style=converter_style)


def deviation(smollm2, base_gguf, lora_file):
    """How llama.cpp's change of the logits (adapter on minus off, on `base_gguf`) differs from PEFT's (on the
    dequantized fp32 base), over all prompt positions and the whole vocabulary: max abs difference, relative
    Frobenius difference, cosine; and max |logits| gap of the two bases."""
    d_cpp, d_peft, base_gap = [], [], 0.0
    for ids, peft_lora, peft_base in zip(smollm2["tokens"], smollm2["peft"], smollm2["base"]):
        cpp_base = llama_cpp_logits(base_gguf, ids)
        d_cpp.append(llama_cpp_logits(base_gguf, ids, lora_file) - cpp_base)
        d_peft.append(peft_lora - peft_base)
        base_gap = max(base_gap, np.abs(cpp_base - peft_base).max())
    d_cpp, d_peft = np.concatenate(d_cpp), np.concatenate(d_peft)
    diff = d_cpp - d_peft
    return dict(max_abs=np.abs(diff).max(), rel=np.linalg.norm(diff) / np.linalg.norm(d_peft),
                cos=np.sum(d_cpp * d_peft) / np.linalg.norm(d_cpp) / np.linalg.norm(d_peft),
                effect=np.abs(d_peft).max(), base_gap=base_gap)


def _show(label, result):
    print(f"{label}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))


@pytest.mark.llama_cpp
@needs_llama_cpp
@needs_converter
def test_llama_cpp_on_an_f32_gguf_of_the_same_base_gives_peft_s_change_of_the_logits(smollm2, tmp_path_factory):
    """The exact check: the base converted to f32 GGUF by llama.cpp's own convert_hf_to_gguf.py from the same
    (dequantized) weights PEFT uses, so only the adapter's handling can differ."""
    f32 = tmp_path_factory.mktemp("f32") / "smollm2-f32.gguf"
    done = subprocess.run(
        [sys.executable, str(Path(LLAMA_CPP_SRC) / "convert_hf_to_gguf.py"), "--outtype", "f32", "--outfile",
         str(f32), str(smollm2["folder"])], capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ours = deviation(smollm2, f32, smollm2["ours"])
    theirs = deviation(smollm2, f32, smollm2["converter_style"])
    _show("f32 base, l1ra export", ours)
    _show("f32 base, converter-style", theirs)
    assert ours["effect"] > 1.0, "the adapter must change the logits visibly"
    assert ours["base_gap"] < 0.1
    assert ours["max_abs"] < 0.1 and ours["rel"] < 0.02, ours
    assert theirs["rel"] > 10 * ours["rel"], (ours, theirs)  # the tolerance tells right from per-module-alpha loss


@pytest.mark.llama_cpp
@needs_llama_cpp
def test_llama_cpp_on_the_shipped_q4_1_gguf_loads_the_adapter_and_moves_the_logits_like_peft(smollm2):
    """On the shipped Q4_1 file llama.cpp quantizes activations too (its base alone differs from the dequantized fp32
    forward by more than 1 logit), so this check is loose: the file loads, and its change of the logits points the
    way PEFT's does. The exact comparison is the f32 test above."""
    ours = deviation(smollm2, smollm2["gguf"], smollm2["ours"])
    _show("Q4_1 base, l1ra export", ours)
    assert ours["effect"] > 1.0
    assert ours["cos"] > 0.8 and ours["rel"] < 0.7, ours
