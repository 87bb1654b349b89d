"""`l1ra compare`: L1RA against LoRA, AdaLoRA and the rows that rule out the easy explanations, on real tasks or on
your own data, at the same rank budget, data order, steps, learning-rate schedule and seeds, measured side by side.

    l1ra compare --task sentiment --tune --output-dir benchmarks/compare/sentiment   # tune lr on dev, then report
    l1ra compare --task gsm8k --methods lora,l1ra_tuned --seeds 3 --steps 150 --jobs 2
    l1ra compare --dataset qa.jsonl --model ./my-model --tune --methods base,lora,l1ra_tuned
    l1ra compare --task sentiment --quick          # smoke check, minutes

Rows (`--methods`, methods.py): base (untrained adapters), head_only (classification head alone), lora, adalora
(PEFT's defaults), adalora_paper (AdaLoRA's paper settings for short runs), l1ra (the paper's method at the library
defaults), l1ra_tuned (the short-run setting), l1ra_nol1 (gates, lambda 0), l1ra_gates (gates, lambda 0, no
reallocation), l1ra_prune (prune only), l1ra_params (a budget in LoRA parameters), dora (optional).

Splits: a dev split is carved from the training data (seeded, the same for every run); `--tune` tries a
learning-rate grid per method on it and keeps each method's best dev setting (plan.py); the reported split is scored
once per final setting and seed. A user's file (`--dataset`, dataset.py) gives both its test and its dev split.
Statistics (stats.py): per-seed differences against LoRA (same seed = same data order and initialisation) with a 95%
t-interval.

Accumulation (results.py): `results.json` in `--output-dir` keeps every run under a hash of its spec; a run whose
spec is already there is not run again, so a comparison can be built over several sittings. `--jobs 2` runs two
single-thread runs side by side (each in its own process, runner.py).

Fairness: one training loop for every method (worker.py, loop.py): AdamW, the same weight-decay rule and gradient
clipping, linear warm-up then cosine decay, the same batches in the same order for a seed, and
`torch.manual_seed(seed)` before the adapter is built (adapters.py). Step time is the wall time of one optimizer
step; an interleaved measurement (every method in one process, one step each in turn) gives the step-time ratios.
Memory is each run's own process's peak RSS (`--in-process` shares one process: not comparable).

The package and its command line are light (no torch at import): the CLI parses before anything heavy loads.
"""

from ..lazy import lazy_exports
from .cli import add_arguments, add_parser, main
from .methods import ADALORA_SETTINGS
from .plan import RunSpec, make_plan

# The public surface for scripts (benchmarks/ use only these names): the command line (add_parser, add_arguments,
# main), a run's settings (RunSpec, make_plan, ADALORA_SETTINGS), and the pieces of one run, which need torch and so
# load on first use: build_task (a task's data), run_one (one run), wrap_model (a method's adapter and optimizer),
# lr_lambda / train_step / Precision (the training loop).
_LAZY = {
    "build_task": "worker", "run_one": "worker", "wrap_model": "adapters", "lr_lambda": "loop", "train_step": "loop",
    "Precision": "loop",
}

__all__ = ["ADALORA_SETTINGS", "RunSpec", "add_arguments", "add_parser", "main", "make_plan", *_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
