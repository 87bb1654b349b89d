"""This process's memory: what it holds now and its peak (read so that a process started by a big parent reports its
own figures), and how glibc keeps freed memory during a CPU training run.

A training step on the CPU allocates and frees the same large buffers every step (activations, logits, gradients).
glibc's malloc gives freed memory above its trim threshold back to the kernel and serves big blocks with fresh
`mmap`s, so every step faults the same pages in again: `make run` spent about a quarter of its CPU time in the kernel.
Telling malloc to keep what it freed removes most of those page faults (benchmarks/train_speed.py, variant `+keep`),
at the price of a resident set that does not shrink between steps.
"""

from __future__ import annotations

import ctypes
import os
import resource
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


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # pragma: no cover - non-Linux
        import psutil

        return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process's own memory so far in MiB.

    Linux: `VmHWM` of /proc/self/status, the high-water mark of the address space this program runs in (a fresh one
    after exec). Not `getrusage(...).ru_maxrss`: Linux carries it across fork and exec, so a worker started by a
    parent holding 1 GB would report at least 1 GB whatever it does itself."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - non-Linux
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if os.uname().sysname == "Darwin" else peak / 1024


def peak_memory(device: str) -> dict:
    """This process's peak resident memory (MiB), and on CUDA the peak memory torch allocated on the GPU."""
    figures = {"peak_rss_mb": round(peak_rss_mb())}
    if device == "cuda":
        import torch

        figures["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / (1 << 20))
    return figures
