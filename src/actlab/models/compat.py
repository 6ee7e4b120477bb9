"""Names that differ between transformers 5.x releases, in one place.

transformers renamed the KV-cache argument and output field `past_key_values` to `cache` (5.2x; the old
name is deprecated and goes away in 5.40). actlab supports the whole 5.x line, so it asks the model."""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.cache
def _cache_kwarg_of(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model: Any) -> str:
    """The keyword under which `model.forward` takes a KV cache."""
    return _cache_kwarg_of(type(model))


def with_cache(model: Any, cache: Any) -> dict[str, Any]:
    """Keyword arguments that pass `cache` to `model`'s forward."""
    return {cache_kwarg(model): cache}


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned."""
    return output["cache"] if "cache" in output else output.past_key_values


def call_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache a forward was called with (from a hook's kwargs), or None (GPT-NeoX's layers name it
    `layer_past`)."""
    for name in ("cache", "past_key_values", "layer_past"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None
