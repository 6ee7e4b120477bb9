"""The protocol every layer-removal method implements (the layer family's `Method`).

A method chooses blocks ("L3") and / or sublayers ("L3.attn", "L3.mlp") to remove from calibration data,
until at least `target` of the non-embedding parameters are gone (importance.py), and returns a `LayerRecipe`
that records what it measured.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

from actlab.transforms.base import Method
from actlab.transforms.layers.importance import removed_fraction
from actlab.transforms.layers.recipe import LayerRecipe


class LayerMethod(Method):
    family = "layers"
    name: ClassVar[str]
    paper: ClassVar[str]
    removes: ClassVar[str]  # "blocks", "attention sublayers", ... (for --list-methods)
    measures_loss: ClassVar[bool] = False  # runs a forward pass per candidate (slow: SLEB, joint)
    progress: bool = False  # show progress over the measured candidates

    @abstractmethod
    def calibrate(self, calib: Any, target: float) -> LayerRecipe:
        """The parts to remove for `target` (a fraction of the non-embedding parameters)."""

    def params(self) -> dict[str, Any]:
        return {}

    def recipe(self, calib: Any, target: float, drop: list[str], measured: dict[str, Any],
               repair: dict[str, Any] | None = None) -> LayerRecipe:
        lm = calib.lm
        calibration = {**calib.describe(), "removed_fraction": removed_fraction(lm.adapter, drop), **measured}
        return LayerRecipe(self.name, lm.identity.to_dict(), list(drop), target=target, params=self.params(),
                           calibration=calibration, repair=repair or {})
