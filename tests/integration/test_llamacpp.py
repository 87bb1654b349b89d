"""`--format gguf`: the llama.cpp LoRA file is what llama.cpp's own converter writes, and llama.cpp itself (through
llama-cpp-python) changes the next-token logits of the shipped SmolLM2 GGUF the way PEFT does on the same base.

The llama.cpp checks run only where they can: `llama_cpp` importable (llama-cpp-python, built from its PyPI sdist),
and for the converter comparison `LLAMA_CPP_SRC` pointing at a llama.cpp source tree (e.g. the `vendor/llama.cpp`
folder of the llama-cpp-python sdist)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from l1ra import export as ex
from l1ra.app.deploy import gguf_export as ge

from helpers import patterned_adapter, read_gguf, save_patterned_run

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return save_patterned_run(tmp_path_factory.mktemp("gguf"))


LLAMA_CPP_SRC = os.environ.get("LLAMA_CPP_SRC")


@pytest.mark.slow  # runs llama.cpp's converter script
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


@pytest.mark.slow  # runs llama.cpp's converter script
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
