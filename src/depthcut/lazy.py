"""Package attributes imported on first use (PEP 562), for the packages whose modules import torch.

`import depthcut` or `from depthcut.pipeline.configs import PruneConfig` then costs milliseconds, so
that `depthcut --help` and a mistyped option answer at once; `depthcut.analyze` still works as if it
had been imported at the top.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_attributes(package: str, modules: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`: `modules` maps each module to the public names it
    gives the package, space-separated."""
    sources = {name: module for module, names in modules.items() for name in names.split()}

    def __getattr__(name: str) -> object:
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(sources[name]), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(sources) | set(vars(sys.modules[package])))

    return __getattr__, __dir__
