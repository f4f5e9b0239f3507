"""Lets `import src.inference_pio...` work from a checkout root.

`src.inference_pio.X` is made the very same module object as `inference_pio.X` (not a second
copy, which would duplicate classes and registries). Not part of the installed package."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_PREFIX = __name__ + "."
_SRC = str(Path(__file__).resolve().parent)


class _AliasLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(spec.name[len(_PREFIX):])

    def exec_module(self, module: ModuleType) -> None:
        pass  # already executed under its real name


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(_PREFIX + "inference_pio"):
            return None
        real = importlib.util.find_spec(fullname[len(_PREFIX):])
        if real is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(),
                                              is_package=real.submodule_search_locations is not None)


if _SRC not in sys.path:
    sys.path.insert(0, _SRC)  # so that the real package imports even when not pip-installed
if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())
