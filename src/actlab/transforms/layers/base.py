"""The protocol every layer-removal method implements (the layer family's `Method`).

A method chooses blocks ("L3") and / or sublayers ("L3.attn", "L3.mlp") to remove from calibration data,
until at least `target` of the non-embedding parameters are gone (importance.py), and returns a `LayerRecipe`
that records what it measured.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

from actlab.errors import ConfigError
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
    # removes one part per step until the budget is reached, each step recorded with the fraction it has saved
    # by then: the recipe for a smaller budget on the same calibration set is a prefix of a larger one's
    greedy: ClassVar[bool] = False

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

    def prefix(self, recipe: LayerRecipe, adapter: Any, target: float) -> LayerRecipe:
        """What `calibrate` returns for a smaller `target` on the calibration set `recipe` was calibrated on,
        without measuring again: its steps up to the first that saves `target` (greedy methods only)."""
        steps = recipe.calibration.get("steps", [])
        if not self.greedy:
            raise ConfigError(f"{self.name} is not greedy: calibrate it for {target:.1%} on its own")
        if recipe.method != self.name or not 0 <= target <= recipe.target or any("saved" not in s for s in steps):
            raise ConfigError(f"a {self.name} recipe for {target:.1%} is not a prefix of {recipe.describe()} "
                              f"(calibrated for {recipe.target:.1%})")
        count = next((k + 1 for k, s in enumerate(steps) if s["saved"] >= target), len(steps)) if target > 0 else 0
        drop = recipe.drop[:count]
        measured = {k: v for k, v in recipe.calibration.items() if k not in ("removed_fraction", "seconds")}
        measured["steps"] = steps[:count]
        reached = {"loss": steps[count - 1]["loss"], "net_removed_fraction": steps[count - 1]["saved"]} if count \
            else {"loss": measured.get("dense_loss"), "net_removed_fraction": 0.0}
        measured.update({k: v for k, v in reached.items() if k in measured})
        calibration = {**measured, "removed_fraction": removed_fraction(adapter, drop)}
        return LayerRecipe(self.name, recipe.model, drop, target=target, params=dict(recipe.params),
                           calibration=calibration, repair={p: recipe.repair[p] for p in drop if p in recipe.repair})
