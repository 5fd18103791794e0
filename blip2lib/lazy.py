"""Lazy package exports (PEP 562).

A package names its public objects without importing the torch-heavy submodules that define them, so
``python -m blip2lib.X --help`` answers before torch loads and ``from blip2lib.X import Y`` still works: the
submodule is imported on first access, and the name is cached on the package.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, table: dict[str, str], names: list[str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``'s module namespace.

    Args:
        package: the package's ``__name__``.
        table: exported name → the submodule (relative to ``package``) that defines it.
        names: the package's ``__all__`` (listed by ``dir()``).
    """

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{table[name]}", package), name)
        setattr(sys.modules[package], name, value)  # the next access is a plain attribute lookup
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__
