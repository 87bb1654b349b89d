"""A llama.cpp LoRA adapter (GGUF) from a PEFT LoRA adapter, with the same function llama.cpp computes.

Written as llama.cpp's own `convert_lora_to_gguf.py` writes it (read from llama.cpp as vendored by
llama-cpp-python 0.3.36): metadata `general.architecture`, `general.type = "adapter"`, `adapter.type = "lora"`,
`adapter.lora.alpha`; tensors `<gguf name of the base weight>.lora_a` (A, `(r, in)`) and `.lora_b` (B, `(out, r)`) in
float32; for the Llama family the rows of q and k are permuted the way the converter permutes the base weights for
its rope layout (only B's rows move).

llama.cpp keeps one alpha per file and scales each module by `alpha / rank` (by 1 when alpha is 0;
`llama_adapter_lora_weight::get_scale`), so per-module alphas and rsLoRA would be lost. Here each module's scaling is
multiplied into B first, and alpha is written so that llama.cpp's scale is 1 everywhere: `R` when every module has
rank R, else 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ...export import (
    ExportError,
    LoraAdapter,
    check_out,
    fold_scaling,
    pad_ranks,
    prepare,
)
from ..run_dir import find_adapter

# Hugging Face architecture -> llama.cpp architecture name, for the architectures the shipped models use.
SUPPORTED = {"LlamaForCausalLM": "llama", "Gemma3ForCausalLM": "gemma3"}
_ROPE_PERMUTED = {"llama"}  # convert_hf_to_gguf's LlamaModel.undo_permute


def _supported_text() -> str:
    return ", ".join(f"{hf} ({arch})" for hf, arch in SUPPORTED.items())


def base_info(base) -> dict:
    """`{arch, n_head, n_head_kv, n_layer}` of the base model, from its `config.json` folder or its `.gguf` file."""
    path = Path(base)
    if path.is_file() and path.suffix == ".gguf":
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields

        def value(key):
            field = fields.get(key)
            return None if field is None else field.contents()

        arch = value("general.architecture")
        if arch not in SUPPORTED.values():
            raise ExportError(f"{path}: architecture {arch!r} is not supported for gguf export; supported: "
                              f"{_supported_text()}")
        n_head = value(f"{arch}.attention.head_count")
        return dict(arch=arch, n_head=n_head, n_head_kv=value(f"{arch}.attention.head_count_kv") or n_head,
                    n_layer=value(f"{arch}.block_count"))
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ExportError(
            f"base={base}: not a .gguf file nor a folder with config.json; pass --base with the base model's folder "
            "or its GGUF file"
        )
    import json

    config = json.loads(config_path.read_text())
    hf_arch = (config.get("architectures") or [None])[0]
    if hf_arch not in SUPPORTED:
        raise ExportError(f"{config_path}: architecture {hf_arch!r} is not supported for gguf export; supported: "
                          f"{_supported_text()}")
    n_head = config["num_attention_heads"]
    return dict(arch=SUPPORTED[hf_arch], n_head=n_head, n_head_kv=config.get("num_key_value_heads") or n_head,
                n_layer=config["num_hidden_layers"])


def rope_permute_rows(b, n_head: int, n_head_kv: Optional[int] = None):
    """B's rows in the order llama.cpp's converter gives a Llama q/k weight (`LlamaModel.permute`): within each head,
    the two rope halves are interleaved."""
    if n_head_kv is not None and n_head_kv != n_head:
        n_head = n_head_kv
    out = b.shape[0]
    return b.reshape(n_head, 2, out // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def gguf_tensors(adapter: LoraAdapter, info: dict) -> dict:
    """`{gguf tensor name: float32 numpy array}` for a folded adapter (every scaling 1)."""
    import gguf
    import torch

    if adapter.extra:
        raise ExportError(
            f"the adapter also stores {sorted(adapter.extra)[0]} (modules_to_save or other full weights); a llama.cpp "
            "LoRA file holds LoRA pairs only"
        )
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == info["arch"])
    names = gguf.get_tensor_name_map(arch_enum, info["n_layer"])
    out = {}
    for name, m in adapter.modules.items():
        assert m.scaling == 1.0, "fold the scalings first"
        target = names.get_name(name + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise ExportError(f"{name}: llama.cpp's {info['arch']} model has no such weight; it cannot be exported")
        b = m.b.detach().to(device="cpu", dtype=torch.float32)
        if info["arch"] in _ROPE_PERMUTED and target.endswith(("attn_q.weight", "attn_k.weight")):
            kv = info["n_head"] if target.endswith("attn_q.weight") else info["n_head_kv"]
            b = rope_permute_rows(b, info["n_head"], kv)
        out[target + ".lora_a"] = m.a.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        out[target + ".lora_b"] = b.contiguous().numpy()
    return out


def llama_cpp_alpha(adapter: LoraAdapter) -> float:
    """The file's alpha that makes llama.cpp's per-module scale (alpha / rank, or 1 when alpha is 0) equal to 1."""
    ranks = set(adapter.ranks.values())
    return float(ranks.pop()) if len(ranks) == 1 else 0.0


def write_gguf(adapter: LoraAdapter, info: dict, out, name: Optional[str] = None,
               alpha: Optional[float] = None) -> Path:
    """Write the folded `adapter` as a llama.cpp LoRA GGUF file at `out` (renamed into place when complete).
    `alpha` (default: `llama_cpp_alpha(adapter)`, scale 1 everywhere) is for tests that mimic other converters."""
    import gguf

    from ...atomic import atomic_write

    tensors = gguf_tensors(adapter, info)
    alpha = llama_cpp_alpha(adapter) if alpha is None else float(alpha)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch=info["arch"])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_name(name or Path(out).stem)
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, array in tensors.items():
            writer.add_tensor(key, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(out, write)
    return Path(out)


def export_gguf(src, out, rank: Optional[int] = None, budget: Optional[int] = None,
                fraction: Optional[float] = None, base=None, overwrite: bool = False) -> Path:
    """Write the adapter of `src` (an `l1ra train` output folder or a PEFT LoRA adapter folder) as the llama.cpp
    LoRA file `out` and return its path.

    base: the base model's folder (config.json) or its .gguf file; default: the run's model, else the adapter's
    `base_model_name_or_path`. rank: zero-pad every module to this rank (not needed by llama.cpp).
    budget / fraction: as in `l1ra.export.export_adapter`.
    """
    located = find_adapter(src)
    src = located.adapter
    out = check_out(out, src, overwrite)
    if out.is_dir():
        raise ExportError(f"out={out}: is a folder; give the .gguf file to write")
    base = base if base is not None else located.base_model()
    if base is None or not Path(base).exists():
        raise ExportError(
            f"the base model {base!r} is not a local folder or file; pass base= (--base) with the base model's "
            "folder (config.json) or its .gguf file"
        )
    info = base_info(base)
    adapter = fold_scaling(prepare(src, budget=budget, fraction=fraction))
    if rank is not None:
        adapter = pad_ranks(adapter, rank)
    return write_gguf(adapter, info, out)
