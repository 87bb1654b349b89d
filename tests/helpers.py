"""Helpers shared by tests in every folder (imported as `from helpers import ...`; tests/ is on sys.path because
tests/conftest.py lives there): L1RA models and their training, a byte-level tokenizer, a tiny saved Llama and the
`l1ra train` flags for a few-step run, GGUF files and patterned PEFT adapters, a free port."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

import l1ra
from l1ra import L1RAConfig

from conftest import ARCH_CASES, make_batch, make_model


# ---- L1RA on the tiny models of conftest.py ------------------------------------------------------------------


def build(arch, seed=0, **overrides):
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.0, update_every=100, **ARCH_CASES[arch])
    kwargs.update(overrides)
    return l1ra.get_l1ra_model(make_model(arch, seed), L1RAConfig(**kwargs))


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def train_steps(model, batch, n, optimizer=None, hook=True):
    optimizer = optimizer or l1ra.create_optimizer(model, lr=5e-2)
    model.train()
    for _ in range(n):
        model(**batch).loss.backward()
        optimizer.step()
        if hook:
            l1ra.after_optimizer_step(model, optimizer)
        optimizer.zero_grad()
    return optimizer


def kill_gates(model, fraction=0.5, seed=0):
    """Set a random subset of gates to exactly 0 (what the proximal step produces)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in l1ra.gates(model).values():
            gate.masked_fill_(torch.rand(gate.shape, generator=g) < fraction, 0.0)


def trained(arch):
    """An L1RA model of `arch` trained a few steps, with ranks moved and some gates at exactly 0; and its batch."""
    model = build(arch, update_every=2, l1ra_lambda=0.0)
    batch = make_batch(arch)
    opt = train_steps(model, batch, 3, hook=False)
    kill_gates(model, 0.4)
    l1ra.reallocate(model, opt)
    train_steps(model, batch, 1, opt, hook=False)
    kill_gates(model, 0.2, seed=3)  # unpruned zero gates: their A rows vanish from the folded export
    return model, batch


def gated_trained(arch="gpt2"):
    """An L1RA model trained 3 steps, some gates at exactly 0 and the rest strictly between 0 and 1."""
    model = build(arch)
    train_steps(model, make_batch(arch), 3, hook=False)
    kill_gates(model, 0.3)
    with torch.no_grad():
        for gate in l1ra.gates(model).values():
            gate.mul_(0.7)  # gates strictly between 0 and 1 too
    return model

# ---- a tokenizer, a saved Llama, a QA dataset and the flags for a few-step `l1ra train` -------------------------


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer(chat: bool = True):
    """A byte-level tokenizer (261 tokens, no merges) built in memory; with a ChatML template when `chat`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_llm(path, **shape):
    """A tiny Llama and its byte-level tokenizer saved in `path` (a folder `l1ra train --model` takes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    sizes = {**dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2), **shape}
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **sizes)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def qa_rows(n=24):
    return [{"prompt": f"What is {i} plus {i}?", "completion": f"{i} plus {i} is {2 * i}."} for i in range(n)]


TRAIN_FLAGS = ["--max-steps", "4", "--batch-size", "2", "--max-length", "48", "--eval-steps", "2",
               "--save-steps", "2", "--r", "4", "--update-every", "2", "--max-eval", "4"]


# ---- GGUF files and patterned PEFT adapters (the llama.cpp export, .gguf models) -------------------------------


def write_gguf(path: Path, arch: str) -> Path:
    """A minimal GGUF file of architecture `arch` at `path` (a header, a vocabulary, one tensor)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(1)
    w.add_token_list(["a", "b", "c"])
    w.add_tensor("token_embd.weight", np.zeros((3, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_gguf(path):
    """A GGUF file's metadata, tensors (numpy) and tensor types."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    return meta, tensors, {t.name: t.tensor_type.name for t in reader.tensors}


def patterned_adapter(model, seed=0, scale=0.05, use_rslora=False, targets="all-linear"):
    """A PEFT adapter whose ranks and alphas differ per module (what an L1RA run leaves), with random B != 0."""
    from peft import LoraConfig, get_peft_model

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


def save_patterned_run(root: Path) -> Path:
    """A tiny Llama in root/base and a patterned rsLoRA adapter on it in root/adapter."""
    make_model("llama").save_pretrained(root / "base")
    patterned_adapter(make_model("llama"), use_rslora=True).save_pretrained(root / "adapter")
    return root


# ---- a rendezvous port for a process group -------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free now on 127.0.0.1 (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
