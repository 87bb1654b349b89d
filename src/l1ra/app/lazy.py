"""Lazy exports: a package names public functions that live in heavier modules; each module loads on first use, so
that importing the package (and `l1ra --help`) stays light."""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, table: dict[str, str]):
    """`__getattr__` and `__dir__` for `package` whose name `n` is `<package>.<table[n]>.n`, imported on first use."""

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{table[name]}"), name)

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *table})

    return __getattr__, __dir__
