"""Training progress: a live tqdm bar on a terminal, plain periodic lines otherwise (CI logs)."""

from __future__ import annotations

import math
import sys
import time
from typing import Optional, TextIO


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """`update(step, loss=, lr=, moved=)` once per optimizer step; `close()` at the end.

    `live=None` picks a tqdm bar when `stream` is a terminal; plain lines (every `every` steps or `interval` seconds,
    whichever comes first, and at the last step) otherwise.
    """

    def __init__(self, total: int, *, start: int = 0, live: Optional[bool] = None, stream: Optional[TextIO] = None,
                 every: Optional[int] = None, interval: float = 30.0, desc: str = "train"):
        self.total, self.start = total, start
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.every = every or max(1, total // 20)
        self.interval = interval
        self.desc = desc
        self.t0 = time.monotonic()
        self.last_print = self.t0
        self.step = start
        self.bar = None
        if self.live:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, file=self.stream, dynamic_ncols=True,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}")

    def eta(self) -> float:
        done = self.step - self.start
        if done <= 0:
            return float("nan")
        return (time.monotonic() - self.t0) / done * (self.total - self.step)

    def update(self, step: int, *, loss: Optional[float] = None, lr: Optional[float] = None, moved: int = 0) -> None:
        delta, self.step = step - self.step, step
        fields = []
        if loss is not None:
            fields.append(f"loss {loss:.4f}")
        if lr is not None:
            fields.append(f"lr {lr:.2e}")
        fields.append(f"ranks moved {moved}")
        if self.bar is not None:
            self.bar.set_postfix_str(", ".join(fields), refresh=False)
            self.bar.update(max(0, delta))
            return
        now = time.monotonic()
        if step % self.every == 0 or step >= self.total or now - self.last_print >= self.interval:
            self.last_print = now
            print(f"{self.desc} step {step}/{self.total} | {' | '.join(fields)} | elapsed "
                  f"{_fmt_time(now - self.t0)} | left {_fmt_time(self.eta())}", file=self.stream, flush=True)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
