"""Layer removal: whole blocks and attention / MLP sublayers, one file per method behind `LayerMethod`."""

from __future__ import annotations

from actlab.transforms.base import make_method
from actlab.transforms.layers.base import LayerMethod
from actlab.transforms.layers.gromov import Gromov
from actlab.transforms.layers.importance import check_budget, removed_fraction
from actlab.transforms.layers.joint import Joint
from actlab.transforms.layers.llm_drop import AttentionDrop, MLPDrop
from actlab.transforms.layers.recipe import LayerRecipe, remove_blocks
from actlab.transforms.layers.shortgpt import ShortGPT
from actlab.transforms.layers.sleb import SLEB

METHODS: dict[str, type[LayerMethod]] = {cls.name: cls for cls in (ShortGPT, Gromov, SLEB, AttentionDrop, MLPDrop,
                                                                  Joint)}


def get_method(name: str, **params) -> LayerMethod:
    return make_method(METHODS, "layer", name, **params)  # type: ignore[return-value]


__all__ = ["METHODS", "LayerMethod", "LayerRecipe", "check_budget", "get_method", "remove_blocks", "removed_fraction"]
