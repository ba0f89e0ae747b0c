"""Lazy package attributes (PEP 562): a package names where each public name lives and
imports that module on first use. So a program that needs one light piece of a layer (the
CLI's one-shot commands need the rpc status codes and blocking driver, and the client TLS
context) does not import the rest of it (trio, the server, ``cryptography``)."""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping


def lazy_exports(package: str, homes: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``homes`` maps a name to its submodule."""

    def __getattr__(name: str) -> object:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home}"), name)
        setattr(sys.modules[package], name, value)  # later uses are plain attribute reads
        return value

    return __getattr__
