"""What a model plugin is: a named binding of checkpoint ids, defaults and prompt formats to an
architecture's model code. Plugins are found through models.registry (built-in names and the
`inference_pio.models` entry-point group)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inference_pio.models.registry import import_object


@dataclass(frozen=True)
class PluginSpec:
    """Entry-point target of a plugin. `factory` is "module:function" (imported lazily, so
    listing plugins imports no torch) returning the plugin object."""

    name: str
    description: str
    architectures: tuple[str, ...]
    default_model_id: str
    factory: str

    def create(self, model_path: str | None = None, **options: Any) -> Any:
        factory: Callable[..., Any] = import_object(self.factory)
        return factory(model_path, **options)


def create_plugin(name: str, model_path: str | None = None, **options: Any) -> Any:
    """Create the plugin registered under `name` (e.g. "qwen3_coder_30b")."""
    from inference_pio.models.registry import get_plugin_spec

    spec = get_plugin_spec(name)
    if not isinstance(spec, PluginSpec):
        raise TypeError(f"plugin {name!r} resolves to a {type(spec).__name__}, not a PluginSpec")
    return spec.create(model_path, **options)
