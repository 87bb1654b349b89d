"""The options of `l1ra train`: one dataclass (CLI flags and config-file keys use its field names with dashes),
the shipped presets and the checks that name the flag to fix."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Literal, Optional

from ..errors import UserError
from ..schedule import SCHEDULE_FLAGS, steps_or_fraction

DEFAULT_OUTPUT_DIR = "runs/train"


class RunError(UserError, RuntimeError):
    """A user-facing failure of a run: one line, naming the problem and the fix."""


@dataclass
class TrainOptions:
    """Every knob of `l1ra train` (the CLI flags and config-file keys use the same names, with dashes)."""

    model: Optional[str] = field(default=None, metadata={"help": "hub id or local folder of the base model (default: the shipped SmolLM2-135M-Instruct)"})
    dataset: Optional[str] = field(default=None, metadata={"help": "hub dataset name or a local .json/.jsonl/.csv/.parquet file (default: the shipped GSM8K)"})
    preset: Optional[Literal["gsm8k", "sentiment"]] = field(default=None, metadata={"help": "a shipped task: 'gsm8k' (the default run) or 'sentiment' (MiniLM on Rotten Tomatoes, scored on SST-2)"})
    output_dir: str = field(default=DEFAULT_OUTPUT_DIR, metadata={"help": "where the adapter, metrics, rank history and plots go"})
    overwrite: bool = field(default=False, metadata={"help": "replace the outputs of an earlier run in --output-dir"})
    resume: Optional[str] = field(default=None, metadata={"help": "resume from a checkpoint: 'auto' (latest in --output-dir) or its path", "const": "auto", "metavar": "CHECKPOINT"})
    max_steps: Optional[int] = field(default=None, metadata={"help": "optimizer steps to train (default: 80 for the default run, 300 for the sentiment preset; with --dataset: --epochs)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training data when --max-steps is not given (default: 1)"})
    lr: float = field(default=2e-4, metadata={"help": "learning rate of the LoRA matrices, cosine schedule with 10%% warm-up (default: 2e-4; sentiment 1e-3)"})
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch (default: 8; sentiment 32)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step (default: 1)"})
    max_length: int = field(default=192, metadata={"help": "tokens per example, longer ones are truncated (default: 192; sentiment 64)"})
    r: int = field(default=8, metadata={"help": "initial LoRA rank of every adapter; the rank budget is r x the number of adapters (default: 8)"})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha; each adapter is scaled by alpha / r (default: 16)"})
    target_modules: Optional[str] = field(default=None, metadata={"help": "comma-separated module names to adapt, or 'all-linear' (default: all-linear; query,key,value,dense for the sentiment preset)"})
    l1ra_lambda: Optional[float] = field(default=None, metadata={"help": "L1 strength on the gates: each step every gate shrinks by (gate lr) x lambda (default: from the run's length, so that the L1 can move a gate by 1.5 over the run: l1ra.reach)"})
    eta_c: Optional[float] = field(default=None, metadata={"help": "learning rate of the gates, on the same schedule (default: 0.1)"})
    update_every: Optional[float] = field(default=None, metadata={"help": "reallocate ranks every this fraction of the steps (0 < f < 1) or every this whole number of steps (default: 0.1)"})
    l1_start: Optional[float] = field(default=None, metadata={"help": "start the L1 penalty after this fraction of the steps (0 <= f < 1) or this whole number of steps (default: 0, from the first step)"})
    seed: int = field(default=0, metadata={"help": "seed of the adapter init, data order and a user dataset's held-out split (default: 0; GSM8K's split is fixed)"})
    load_in_4bit: bool = field(default=False, metadata={"help": "load the base model in 4-bit NF4 (QLoRA; needs bitsandbytes: pip install 'l1ra[quant]'); the adapter and l1ra merge stay full precision"})
    bf16: Optional[bool] = field(default=None, metadata={"help": "mixed precision (default: the device's: on CUDA bf16, or fp16 where the GPU lacks bf16; on a CPU bf16 where it computes bf16 natively, AVX-512-BF16 or AMX; fp32 otherwise)"})
    eval_steps: Optional[int] = field(default=None, metadata={"help": "evaluate on the held-out set every N steps (default: at half time and at the end)"})
    save_steps: Optional[int] = field(default=None, metadata={"help": "write a resumable checkpoint every N steps (default: every quarter of the run)"})
    eval_fraction: float = field(default=0.1, metadata={"help": "fraction of a user dataset held out for evaluation (at most --max-eval examples)"})
    max_eval: int = field(default=200, metadata={"help": "at most this many held-out examples are scored (default: 200; sentiment: all 872)"})
    prompt_column: Optional[str] = field(default=None, metadata={"help": "column with the prompt (needs --completion-column); loss on completions only"})
    completion_column: Optional[str] = field(default=None, metadata={"help": "column with the completion"})
    messages_column: Optional[str] = field(default=None, metadata={"help": "column with chat messages; loss on assistant turns only"})
    text_column: Optional[str] = field(default=None, metadata={"help": "column with plain text; loss on every token"})
    eval_split: Optional[str] = field(default=None, metadata={"help": "hub datasets: the split to evaluate on (default: test/validation if present, else a held-out slice)"})
    report_to: str = field(default="none", metadata={"help": "where the Trainer logs: none, tensorboard, wandb, ... (comma list)"})

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


# ------------------------------------------------------------------------------------------------------------
# Presets

# The default run (SmolLM2-135M-Instruct on GSM8K). lambda is not fixed: it follows the run's length (l1ra.reach,
# reach 1.5: the setting chosen on the sentiment dev split), which at the default 80 steps is lambda 0.375.
LLM_DEFAULTS = dict(max_steps=80, batch_size=8, lr=2e-4, r=8, lora_alpha=16, eta_c=0.1)
SENTIMENT_DEFAULTS = dict(max_steps=300, batch_size=32, max_length=64, lr=1e-3, r=8, lora_alpha=16,
                          target_modules="query,key,value,dense", max_eval=872, eta_c=0.1)


def resolve_preset(opts: TrainOptions, explicit: set[str]) -> TrainOptions:
    """Fill unset options from the preset (flags the user gave always win)."""
    preset = opts.preset or ("gsm8k" if opts.dataset is None else None)
    if preset not in (None, "gsm8k", "sentiment"):
        raise RunError(f"--preset {opts.preset}: unknown preset; use 'gsm8k' or 'sentiment'")
    if preset == "sentiment" and (opts.dataset or opts.model):
        raise RunError("--preset sentiment uses the shipped MiniLM and Rotten Tomatoes; drop --model/--dataset")
    defaults = dict(SENTIMENT_DEFAULTS if preset == "sentiment" else LLM_DEFAULTS)
    if preset is None or "epochs" in explicit:
        defaults.pop("max_steps")  # a user dataset (or --epochs) trains for --epochs unless --max-steps is given
    values = dataclasses.asdict(opts)
    for key, value in defaults.items():
        if key not in explicit:
            values[key] = value
    if preset == "gsm8k" and opts.dataset is None and "dataset" not in explicit:
        values["dataset"] = None
    values["preset"] = preset
    return TrainOptions(**values)


def _targets(spec: Optional[str]):
    if spec is None or spec.strip() == "all-linear":
        return "all-linear"
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise RunError("--target-modules is empty; give names like q_proj,v_proj or all-linear")
    return names


def _flagify(message: str) -> str:
    # "L1RAConfig.eta_c=0 is invalid: ..." -> "--eta-c 0 is invalid: ..."
    return re.sub(r"L1RAConfig\.(\w+)=", lambda m: "--" + m.group(1).replace("_", "-") + " ", message)


def _validate(opts: TrainOptions) -> None:
    for name in ("batch_size", "grad_accum", "max_length", "r", "max_eval"):
        if getattr(opts, name) < 1:
            raise RunError(f"--{name.replace('_', '-')} {getattr(opts, name)}: must be >= 1")
    if opts.max_steps is not None and opts.max_steps < 1:
        raise RunError(f"--max-steps {opts.max_steps}: must be >= 1")
    for name in ("eval_steps", "save_steps"):
        if getattr(opts, name) is not None and getattr(opts, name) < 1:
            raise RunError(f"--{name.replace('_', '-')} {getattr(opts, name)}: must be >= 1")
    if not (opts.epochs > 0):
        raise RunError(f"--epochs {opts.epochs}: must be > 0")
    if not (opts.lr > 0 and math.isfinite(opts.lr)):
        raise RunError(f"--lr {opts.lr}: must be a finite number > 0")
    if not (0 < opts.eval_fraction < 1):
        raise RunError(f"--eval-fraction {opts.eval_fraction}: must be in (0, 1)")
    if opts.max_length < 8:
        raise RunError(f"--max-length {opts.max_length}: too short, use at least 8 tokens")
    for flag in SCHEDULE_FLAGS:  # one rule with `l1ra compare` (schedule.py)
        steps_or_fraction(flag, getattr(opts, flag[2:].replace("-", "_")))
    report_to_list(opts.report_to)


# The Trainer's logging integrations (transformers 5.x, `integrations.integration_utils.INTEGRATION_TO_CALLBACK`;
# importing that module takes seconds, so the names are listed here) -> the module each one needs, when known.
REPORT_TO = {
    "tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",), "clearml": ("clearml",), "dvclive": ("dvclive",), "neptune": ("neptune",),
    "codecarbon": ("codecarbon",), "swanlab": ("swanlab",), "trackio": ("trackio",), "dagshub": ("dagshub",),
    "azure_ml": ("azureml",), "flyte": ("flytekit",), "kubeflow": (),
}


def report_to_list(value) -> list[str]:
    """`--report-to` as the list `TrainingArguments(report_to=...)` takes ([] for none), checked at start-up.

    Unknown names and integrations whose package is missing raise `RunError` naming the fix.
    """
    names = value if isinstance(value, (list, tuple)) else str(value or "none").split(",")
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    if not names or names == ["none"]:
        return []
    if names == ["all"]:
        return ["all"]
    bad = [n for n in names if n not in REPORT_TO]
    if bad:
        raise RunError(f"--report-to {value}: unknown integration {', '.join(bad)}; use none, all or a comma list of "
                       f"{', '.join(sorted(REPORT_TO))}")
    from ..extras import installed

    for name in names:
        modules = REPORT_TO[name]
        if modules and not any(installed(m) for m in modules):
            fix = "pip install 'l1ra[tensorboard]'" if name == "tensorboard" else f"pip install {modules[0]}"
            raise RunError(f"--report-to {name} needs the '{modules[0]}' package, not installed; install it with: {fix}")
    return names
