"""What reaches the terminal: third-party progress bars, info logs and warnings the user cannot act on are silenced;
l1ra's own warnings stay."""

from __future__ import annotations

import sys

from .extras import installed


# Third-party warning noise, silenced by category and the module the warning is attributed to. Never a blanket
# filter, never UserWarning: l1ra's own warnings ("l1ra: ...", UserWarning) must reach the user, and one raised
# inside a Trainer callback is attributed to transformers' module.
_THIRD_PARTY = r"(torch|transformers|peft|accelerate|datasets|trl|huggingface_hub|tokenizers|safetensors)(\..*)?$"
_NOISE = (
    # deprecations inside the libraries l1ra calls (e.g. PEFT reading transformers' deprecated
    # `is_gradient_checkpointing` on every PeftModel): nothing a user of `l1ra` can act on
    (FutureWarning, _THIRD_PARTY),
    (DeprecationWarning, _THIRD_PARTY),
)


def quiet_third_party() -> None:
    """Silence the libraries' progress bars, info logs and known warning noise; l1ra's own warnings stay."""
    import warnings

    for category, module in _NOISE:
        warnings.filterwarnings("ignore", category=category, module=module)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass
    if "datasets" in sys.modules or installed("datasets"):
        try:
            import datasets

            # datasets logs its own ERROR line before raising on a bad file; the CLI's one-line error says it
            datasets.logging.set_verbosity(datasets.logging.CRITICAL)
            datasets.disable_progress_bars()
        except ImportError:
            pass


BNB_KERNELS_NOTE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_the_kernels_note(record) -> bool:
    return not str(record.msg).startswith(BNB_KERNELS_NOTE)


def show_bnb_kernels_note(show: bool) -> None:
    """bitsandbytes (imported by PEFT whenever it is installed) warns on CPUs with AVX-512-BF16 that the optional
    `kernels` package is missing. That kernel would only serve 4-bit inference, so the note is hidden unless the run
    loads a 4-bit base; every other bitsandbytes message still shows."""
    import logging

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    logger.removeFilter(_not_the_kernels_note)
    if not show:
        logger.addFilter(_not_the_kernels_note)
