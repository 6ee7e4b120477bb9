"""actlab: profile the insides of Hugging Face causal LMs and transform them, with the cost measured.

The top-level names are imported on first use (PEP 562), so `import actlab` and the command line's help and
argument errors do not wait for torch and transformers."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from actlab.errors import ActlabError

__version__ = "0.1.0"
_LAZY = {"LoadedModel": "actlab.models", "load_model": "actlab.models", "wrap": "actlab.models",
         "sparsify": "actlab.api", "intervene": "actlab.transforms.steer", "record": "actlab.transforms.steer"}
__all__ = ["ActlabError", "LoadedModel", "__version__", "intervene", "load_model", "record", "sparsify", "wrap"]

if TYPE_CHECKING:
    from actlab.api import sparsify  # noqa: F401
    from actlab.models import LoadedModel, load_model, wrap  # noqa: F401
    from actlab.transforms.steer import intervene, record  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'actlab' has no attribute {name!r}")
