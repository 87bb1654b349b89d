"""Write a whole folder under a temporary name, then swap it into place: readers never see it half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_dir(target) -> Iterator[Path]:
    """`with atomic_dir(out) as tmp: write into tmp` -- on success `out` is replaced by `tmp` in one rename; on an
    error the previous `out` is left as it was and the temporary folder is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
