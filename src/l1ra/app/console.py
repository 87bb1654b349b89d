"""What reaches the terminal: third-party progress bars, info logs and warnings the user cannot act on are silenced;
l1ra's own warnings stay."""

from __future__ import annotations

import sys

from .extras import installed


# Third-party warnings a user of `l1ra` cannot act on, silenced one by one by their message; never by category or
# module alone: a library's warning about how l1ra calls it must reach us, and l1ra's own warnings (UserWarning,
# "l1ra: ...") must reach the user. Python's default filters already hide DeprecationWarnings raised in libraries.
_NOISE = (
    # PEFT reads transformers' deprecated `is_gradient_checkpointing` on every PeftModel (transformers 5)
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)


def quiet_third_party() -> None:
    """Silence the libraries' progress bars, info logs and known warning noise; l1ra's own warnings stay."""
    import warnings

    for category, message in _NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
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
