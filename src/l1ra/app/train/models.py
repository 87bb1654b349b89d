"""Loading the base model and tokenizer of a run, with one-line errors that name the flag."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .options import RunError


def resolve_model_path(spec: Optional[str]) -> str:
    """The folder (or hub id) to load: the converted SmolLM2 for None, a converted folder for a `.gguf` file."""
    if spec is None or str(spec).lower().endswith(".gguf"):
        from ..assets import resolve_model_spec

        return str(resolve_model_spec(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise RunError(f"--model {spec}: not a model folder (no config.json); give a transformers model folder or a hub id")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise RunError(f"--model {spec}: folder not found")
    return spec


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise RunError(f"--model {path}: cannot load its tokenizer ({_first_line(err)})") from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise RunError(f"--model {path}: the tokenizer has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, task: str, load_in_4bit: bool = False, plan=None, attn_implementation: Optional[str] = None):
    """The base model in the plan's precision (`DevicePlan.model_dtype`: bf16 or fp16 on CUDA, float32 elsewhere; the
    adapters and gates added later stay float32 and the Trainer's autocast runs the mixed precision), or with
    `load_in_4bit` its linear layers in 4-bit NF4 on the plan's device (QLoRA: bitsandbytes quantizes while loading,
    so the model is placed here; the Trainer leaves a quantized model where it is). `attn_implementation`: the
    attention kernel (`devices.attention_for`), transformers' choice when None."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    kwargs = {"num_labels": 2} if task == "classification" else {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        device = quantized_device(plan)
        if device == "cpu":
            check_4bit_shapes(path, cls, kwargs)
        kwargs.update(quantization_config=nf4_config(plan), device_map={"": device})
    try:
        model = cls.from_pretrained(path, dtype=plan.model_dtype() if plan is not None else torch.float32, **kwargs)
    except Exception as err:
        raise RunError(f"--model {path}: cannot load it as a {'classifier' if task == 'classification' else 'causal LM'}"
                       f"{' in 4 bits' if load_in_4bit else ''} ({_first_line(err)})") from None
    if load_in_4bit:
        keep_4bit_weights_unpacked(model)
    return model


def keep_4bit_weights_unpacked(model) -> int:
    """Keep bitsandbytes from repacking NF4 weights for its AVX-512-BF16 CPU kernel (returns the layers changed).

    On such CPUs `Linear4bit.forward` repacks a weight at its first no-grad forward in eval mode (the held-out
    evaluation before training) and never unpacks it; every later forward, training ones included, then goes through
    `bitsandbytes::gemv_4bit`, an op without an autograd formula, so the gradient through the frozen base layer to
    the layers before it would be lost (read in bitsandbytes 0.50 `nn/modules.py` and `autograd/_functions.py`; this
    machine has no AVX-512-BF16 to run it). Training and evaluation then share the dequantize-and-matmul path on every
    CPU; GPUs never take that branch."""
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def nf4_config(plan):
    """QLoRA's quantization: NF4 with double quantization, computing in the plan's mixed precision."""
    import torch
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if plan.bf16 else torch.float16 if plan.fp16 else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


NF4_CPU_BLOCK = 64  # bitsandbytes' 4-bit block size; its AVX-512 CPU kernel packs whole blocks of both dimensions


def check_4bit_shapes(path: str, cls, kwargs: dict) -> None:
    """Refuse, before quantizing, a model that bitsandbytes cannot run in 4 bits on a CPU: on CPUs with AVX-512-BF16
    it repacks every NF4 weight for its kernel at the first evaluation, which needs in and out features that are
    multiples of 64 (other shapes crash there, in `_convert_weight_packed_for_cpu`). The same rule on every CPU, so a
    run does not depend on which CPU it meets. The model is built on the meta device from its config (no weights)."""
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoConfig
    from transformers.quantizers.base import get_keys_to_not_convert

    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
        with init_empty_weights():
            model = cls.from_config(config)
    except Exception:
        return  # an unreadable model gets load_model's own error
    kept = get_keys_to_not_convert(model)  # what transformers leaves unquantized (the output head)
    bad = [f"{name} ({m.in_features} -> {m.out_features})" for name, m in model.named_modules()
           if isinstance(m, nn.Linear) and not any(name == k or name.startswith(k + ".") for k in kept)
           and (m.in_features % NF4_CPU_BLOCK or m.out_features % NF4_CPU_BLOCK)]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise RunError(f"--load-in-4bit: on the CPU, bitsandbytes' 4-bit kernels need linear layers whose in and out "
                       f"features are multiples of {NF4_CPU_BLOCK}; {path} has {', '.join(bad[:3])}{more}. Train "
                       "this model without --load-in-4bit, or on CUDA")


def quantized_device(plan) -> str:
    """The device a 4-bit model is loaded onto: this process's GPU under torchrun/accelerate, else the plan's."""
    if plan.device == "mps":
        raise RunError("--load-in-4bit: bitsandbytes does not quantize on Apple MPS; train without it, or on CUDA/CPU")
    if plan.device == "cuda":
        from accelerate import PartialState

        return str(PartialState().device)  # cuda:<local rank>
    return "cpu"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:240]


def check_target_modules(model, targets) -> None:
    """Target modules that match nothing get a clear error naming the linear layers the model has."""
    from torch import nn

    if targets == "all-linear":
        return
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise RunError(f"--target-modules: {', '.join(missing)} match no linear layer of the model; it has: "
                       f"{', '.join(suffixes[:20])} (or use all-linear)")
