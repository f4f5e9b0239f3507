"""Small, explicit, lazy registries: name -> "module:attr" strings imported on first use, plus
third-party plugins from the `inference_pio.models` entry-point group."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

T = TypeVar("T")

ENTRY_POINT_GROUP = "inference_pio.models"


class RegistryError(KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def import_object(path: str) -> Any:
    """Import "package.module:attr"."""
    module_name, _, attr = path.partition(":")
    if not attr:
        raise RegistryError(f"{path!r} is not of the form 'module:attr'")
    return getattr(importlib.import_module(module_name), attr)


class Registry(Generic[T]):
    """name -> object, where an entry may be a "module:attr" string resolved lazily."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = {}

    def register(self, name: str, obj: T | str | None = None) -> Callable[[T], T] | None:
        """`registry.register("x", "mod:Cls")`, or as a decorator `@registry.register("x")`."""
        if obj is not None:
            self._add(name, obj)
            return None

        def decorator(target: T) -> T:
            self._add(name, target)
            return target

        return decorator

    def _add(self, name: str, obj: T | str) -> None:
        if name in self._entries and self._entries[name] is not obj:
            raise RegistryError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj

    def get(self, name: str) -> T:
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise RegistryError(f"unknown {self.kind} {name!r}; known: {known}")
        entry = self._entries[name]
        if isinstance(entry, str):
            entry = import_object(entry)
            self._entries[name] = entry
        return entry  # type: ignore[return-value]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


# Hugging Face `architectures[0]` -> model class. One class serves MoE and dense Qwen3.
MODELS: Registry[type] = Registry("architecture")
MODELS.register("Qwen3MoeForCausalLM", "inference_pio.models.qwen3_moe:Qwen3MoeForCausalLM")
MODELS.register("Qwen3ForCausalLM", "inference_pio.models.qwen3_moe:Qwen3MoeForCausalLM")

# Product plugins: name -> PluginSpec (see models.plugin_base).
PLUGINS: Registry[Any] = Registry("model plugin")
PLUGINS.register("qwen3_coder_30b", "inference_pio.models.qwen3_coder_30b.plugin:PLUGIN_SPEC")


@functools.cache
def load_entry_point_plugins() -> None:
    """Register plugins that installed packages declare under `inference_pio.models` (once)."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in PLUGINS:
            PLUGINS.register(ep.name, ep.value)


def get_plugin_spec(name: str) -> Any:
    load_entry_point_plugins()
    return PLUGINS.get(name)


def list_plugins() -> list[str]:
    load_entry_point_plugins()
    return PLUGINS.names()
