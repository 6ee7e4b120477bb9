"""Load models by name, hub id, directory or GGUF file; cache; architecture adapters; identity; key names."""

from actlab.models.adapter import LayerView, LinearView, ModelAdapter, adapter_for
from actlab.models.identity import ModelIdentity
from actlab.models.loader import LoadedModel, list_models, load_model, wrap
from actlab.models.registry import BUILTINS, DEFAULT_MODEL

__all__ = ["BUILTINS", "DEFAULT_MODEL", "LayerView", "LinearView", "LoadedModel", "ModelAdapter", "ModelIdentity",
           "adapter_for", "list_models", "load_model", "wrap"]
