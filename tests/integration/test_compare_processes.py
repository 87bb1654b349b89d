"""`l1ra compare` runs in their own processes: an isolated run's peak memory is its own, a failed run is an error, and
two jobs train side by side. In-process: tests/app/test_compare.py."""

from __future__ import annotations

import pytest
import torch

from l1ra.app.memory import rss_mb
from l1ra.app.compare.plan import RunSpec
from l1ra.app.compare.runner import run_compare, run_isolated

pytestmark = pytest.mark.slow  # every test starts processes


def spec(method, **kw):
    """A run on the tiny task (LoRA or L1RA) with the settings of tests/app/test_compare.py."""
    return RunSpec(**{**dict(task="tiny", method=method, seed=0, steps=10, batch_size=4, lr=5e-3, max_length=16, rank=4,
                             dev_size=16), **kw})


def test_isolated_run_in_its_own_process(tmp_path):
    # the parent holds ~400 MiB that an isolated run must not count as its own peak
    ballast = torch.ones(100 * 2**20)  # 400 MiB, touched
    parent = rss_mb()
    result = run_isolated(spec("l1ra", steps=3), tmp_path / "run.log")
    assert result["method"] == "l1ra" and result["peak_rss_mb"] < parent - 300
    del ballast
    with pytest.raises(RuntimeError, match="failed"):
        run_isolated(spec("l1ra", steps=3, rank=0), tmp_path / "bad.log")

def test_two_jobs_run_side_by_side(tmp_path):
    # Long enough (seconds of training each) that the jitter of two process start-ups (~1 s) cannot separate them:
    # with 40 steps the trainings took ~0.4 s and a fresh-clone run once missed the overlap by 5 ms.
    specs = [spec("lora", steps=400), spec("l1ra", steps=400)]
    results = run_compare(specs, tmp_path, isolate=True, jobs=2, log=lambda m: None)
    (a0, a1), (b0, b1) = (r["train_interval"] for r in results["runs"])
    assert a0 < b1 and b0 < a1, "the two runs' training overlapped in time"
    assert results["sittings"][-1]["jobs"] == 2
