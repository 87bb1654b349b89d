"""Starting the processes of the integration tests: the repository root, a free port, an environment that runs
this checkout's src/ offline on one thread per process, and a command that must succeed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import free_port

HERE = Path(__file__).resolve().parent  # the worker scripts live here
ROOT = HERE.parents[1]


def env() -> dict:
    """This checkout's src/ and tests/ first on the path, offline, one thread, no launcher variables inherited."""
    out = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), out.get("PYTHONPATH", "")])
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        out.pop(name, None)
    return out


def run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    """Run `cmd` from the repository root; fail the test with the end of its output when it fails."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node nproc ARGS` on a free port."""
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port()), *args], timeout=timeout)
