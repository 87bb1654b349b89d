"""Host-memory behaviour of a CPU training run.

A training step on the CPU allocates and frees the same large buffers every step (activations, logits, gradients).
glibc's malloc gives freed memory above its trim threshold back to the kernel and serves big blocks with fresh
`mmap`s, so every step faults the same pages in again: `make run` spent about a quarter of its CPU time in the kernel.
Telling malloc to keep what it freed removes most of those page faults (measured in benchmarks/train_speed.py,
variant `l1ra-malloc`), at the price of a resident set that does not shrink between steps.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc <malloc.h>


def keep_freed_memory(trim: int = 1 << 30, top_pad: int = 256 << 20, mmap: int = 32 << 20) -> bool:
    """glibc only (a no-op elsewhere): keep up to `trim` bytes of freed heap, grow the heap `top_pad` at a time, and
    serve blocks below `mmap` bytes from the heap instead of fresh mappings. Returns whether glibc took all three."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in
               ((M_TRIM_THRESHOLD, trim), (M_TOP_PAD, top_pad), (M_MMAP_THRESHOLD, mmap)))


def peak_memory(device: str) -> dict:
    """This process's peak resident memory (MiB), and on CUDA the peak memory torch allocated on the GPU."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    figures = {"peak_rss_mb": round(rss / (1 << 20 if sys.platform == "darwin" else 1 << 10))}
    if device == "cuda":
        import torch

        figures["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / (1 << 20))
    return figures
