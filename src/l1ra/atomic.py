"""Atomic writes: a file or a whole folder is written under a temporary name, then renamed into place, so readers
never see it half-written and an error leaves the previous version as it was. Modes follow the umask (a temporary
file is created private; the result must be as readable as any file the user writes)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode `open()` / `mkdir()` would give a new file (0o666) or folder (0o777) under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


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
        os.chmod(tmp, default_mode(directory=True))
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path, write: Callable[[Path], None]) -> None:
    """`write(tmp_path)` writes the content; then it is renamed to `path` (parents are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path, value: Any, indent: int = 1) -> None:
    atomic_write_text(path, json.dumps(value, indent=indent, default=str) + "\n")
