"""Where a run computes and in which precision: one decision, shared by `train`, `generate` and `merge`.

`plan_device` is a plain function of what the machine offers (passed in, so every branch is testable without a GPU);
`current_plan` asks torch. The Trainer gets the result through `training_arguments()` and does the placement,
autocast and (fp16) loss scaling itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DevicePlan:
    device: str  # "cuda", "mps" or "cpu"
    bf16: bool = False  # bf16 mixed precision (autocast)
    fp16: bool = False  # fp16 mixed precision with the Trainer's gradient scaler

    def training_arguments(self) -> dict:
        """The `TrainingArguments` fields that carry this plan (the Trainer picks cuda > mps > cpu by itself;
        `use_cpu` only tells it that a CPU run is meant, which its bf16 check needs)."""
        return {"bf16": self.bf16, "fp16": self.fp16, "use_cpu": self.device == "cpu"}

    def model_dtype(self):
        """dtype to load the base model in, to train or to generate: the run's half precision on CUDA (bf16, or fp16
        with the scaler), float32 elsewhere. The adapters and gates PEFT and l1ra add stay float32 either way."""
        import torch

        if self.bf16 and self.device == "cuda":
            return torch.bfloat16
        if self.fp16:
            return torch.float16
        return torch.float32

    def describe(self) -> str:
        return f"{self.device}, {'bf16' if self.bf16 else 'fp16' if self.fp16 else 'fp32'}"


def plan_device(*, cuda: bool, mps: bool, cuda_bf16: bool, bf16: Optional[bool] = None,
                cpu_bf16_default: bool = True, cpu_bf16_native: bool = True) -> DevicePlan:
    """Pick the device and the mixed precision.

    - CUDA: half precision unless `bf16` is explicitly False; bf16 where the GPU supports it, else fp16 (the Trainer
      then scales the loss).
    - MPS: float32 unless bf16 is asked for explicitly.
    - CPU: bf16 autocast when asked for (`bf16`); by default (`cpu_bf16_default`, on for `l1ra train`, whatever the
      model and data) only where the CPU computes bf16 natively (AVX-512-BF16 or AMX, `cpu_bf16_native`): on an
      AVX2-only CPU bf16 autocast is emulated and measured 4-6x slower than float32 (see docs/train_speed.md).
    `bf16=None` means "not given by the user".
    """
    if cuda:
        if bf16 is False:
            return DevicePlan("cuda")
        return DevicePlan("cuda", bf16=cuda_bf16, fp16=not cuda_bf16)
    if mps:
        return DevicePlan("mps", bf16=bool(bf16))
    return DevicePlan("cpu", bf16=(cpu_bf16_default and cpu_bf16_native) if bf16 is None else bool(bf16))


def current_plan(bf16: Optional[bool] = None, cpu_bf16_default: bool = True) -> DevicePlan:
    import torch

    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return plan_device(cuda=cuda, mps=mps, cuda_bf16=cuda and cuda_bf16_native(), bf16=bf16,
                       cpu_bf16_default=cpu_bf16_default, cpu_bf16_native=cpu_bf16_native())


def attention_for(device: str, flash_attn_installed: bool) -> Optional[str]:
    """The attention kernel a causal-LM run loads its model with: flash-attention 2 on CUDA where the `flash_attn`
    package is installed (a varlen kernel: batches are then packed, see `packs_batches`), else transformers' own
    choice (SDPA). On a CPU eager attention was not reliably faster than SDPA in benchmarks/train_speed.py and held
    about 15% more memory."""
    return "flash_attention_2" if device == "cuda" and flash_attn_installed else None


def flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def packs_batches(device: str, attn_implementation: Optional[str]) -> bool:
    """Whether a causal-LM run trains and evaluates on padding-free (packed) batches: one row of concatenated examples
    whose attention stays within each example.

    Only where the attention kernel is varlen (flash-attention on CUDA: `flash_attention_2`, `flash_attention_3` or a
    kernels-hub flash kernel), which attends within each example at the cost of its own length. Every other kernel
    (SDPA, eager; on a CPU, MPS, or CUDA without flash-attention) gets the packed row as one sequence with a
    block-diagonal mask and pays for attention over the whole row: there a packed step measured slower than a padded
    one (benchmarks/train_speed.py, docs/train_speed.md), so batches are padded.
    """
    return device == "cuda" and "flash" in (attn_implementation or "")


def cuda_bf16_native() -> bool:
    """Whether the GPU computes bf16 in hardware (compute capability 8.0+). `torch.cuda.is_bf16_supported()` also
    counts emulation (T4, V100), which is slower than fp16 with the scaler."""
    import torch

    return torch.cuda.is_bf16_supported(including_emulation=False)


def cpu_bf16_native() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX-512-BF16 or AMX); torch exposes the checks in `torch.cpu`."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if callable(check))
