"""`l1ra train` and `l1ra report`: the command line (command.py) and options (options.py); the recipe that puts the
library's pieces together (recipe.py); the run's examples (examples.py) from a user's file (data.py: formats and
tokenisation) or the shipped sets (shipped_data.py); the models (models.py) and Trainers (trainers.py); the live
records of a run (monitor.py, progress.py, processes.py under torchrun) and its plots and summary
(report.py). Light: nothing heavy is imported with the package."""

from ..lazy import lazy_exports

# The public surface for scripts (benchmarks/train_speed.py builds the recipe's Trainer from these), loaded on first use.
_LAZY = {"Format": "data", "sft_rows": "data", "tokenize_rows": "data", "gsm8k_split": "shipped_data",
         "load_model": "models", "load_tokenizer": "models", "build_trainer": "trainers"}

__all__ = [*_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
