"""The protocol every layer-removal method implements (the layer family's `Method`).

A method chooses blocks ("L3") and / or sublayers ("L3.attn", "L3.mlp") to remove from calibration data,
until at least `target` of the non-embedding parameters are gone (importance.py), and returns a `LayerRecipe`
that records what it measured.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable
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

    # a greedy method calls it with the recipe as it stands after every step (the layers job keeps it on disk,
    # so an interrupted calibration resumes from its last step)
    checkpoint: Callable[[LayerRecipe], None] | None = None

    def calibrate(self, calib: Any, target: float, start: LayerRecipe | None = None) -> LayerRecipe:
        """The parts to remove for `target` (a fraction of the non-embedding parameters). A greedy method given
        `start` (its own recipe on the same calibration set, `resume`) continues from its steps instead of
        measuring them again: what it returns is what calibrating from nothing would. The recipe records the
        calibration's seconds, those its start had taken included."""
        start = self.resume(calib, start, target)
        self._spent = (start.calibration.get("seconds") or 0.0) if start is not None else 0.0
        self._began = time.perf_counter()
        recipe = self.choose(calib, target, start)
        recipe.calibration["seconds"] = self.seconds()
        return recipe

    @abstractmethod
    def choose(self, calib: Any, target: float, start: LayerRecipe | None) -> LayerRecipe:
        """`calibrate` without the checks: `start` is None, or (greedy methods) a recipe `resume` accepted."""

    def seconds(self) -> float:
        """Seconds the calibration under way has taken, those of the recipe it continues included."""
        return self._spent + time.perf_counter() - self._began

    def params(self) -> dict[str, Any]:
        return {}

    def recipe(self, calib: Any, target: float, drop: list[str], measured: dict[str, Any],
               repair: dict[str, Any] | None = None) -> LayerRecipe:
        lm = calib.lm
        calibration = {**calib.describe(), "removed_fraction": removed_fraction(lm.adapter, drop), **measured}
        return LayerRecipe(self.name, lm.identity.to_dict(), list(drop), target=target, params=self.params(),
                           calibration=calibration, repair=repair or {})

    def resume(self, calib: Any, start: LayerRecipe | None, target: float) -> LayerRecipe | None:
        """`start` checked as a point a greedy calibration for `target` on `calib` can continue from (None: start
        from nothing). It must be this method's, with the same parameters, on the same model and calibration set,
        for a budget no larger than `target`, with its steps recorded."""
        if start is None:
            return None
        what = f"continuing {start.describe()}"
        if not self.greedy:
            raise ConfigError(f"{self.name} is not greedy: there is no calibration to continue; calibrate it for "
                              f"{target:.1%} on its own")
        if start.method != self.name or start.params != self.params():
            raise ConfigError(f"{what}: it is not a {self.name} recipe with {self.params()} (it has "
                              f"{start.method} with {start.params})")
        start.check_model(calib.lm)
        differ = [k for k, v in calib.describe().items() if start.calibration.get(k) != v]
        if differ:
            raise ConfigError(f"{what}: it was calibrated on another calibration set ({', '.join(differ)} differ); "
                              "give the same --calib, --seq-len and --calib-windows")
        steps = start.calibration.get("steps")
        if steps is None or len(steps) != len(start.drop) or any("saved" not in s for s in steps):
            raise ConfigError(f"{what}: it records no steps to continue from")
        if start.target > target:
            raise ConfigError(f"{what}: it was calibrated for {start.target:.1%}, more than {target:.1%}; its prefix "
                              "for the smaller budget is what calibrating returns (LayerMethod.prefix)")
        return start

    def step_done(self, recipe: LayerRecipe) -> None:
        if self.checkpoint is not None:
            recipe.calibration["seconds"] = self.seconds()
            self.checkpoint(recipe)

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
        # the pending scores are those after the last step: a prefix continued re-measures every candidate
        measured = {k: v for k, v in recipe.calibration.items()
                    if k not in ("removed_fraction", "seconds", "pending")}
        measured["steps"] = steps[:count]
        reached = {"loss": steps[count - 1]["loss"], "net_removed_fraction": steps[count - 1]["saved"]} if count \
            else {"loss": measured.get("dense_loss"), "net_removed_fraction": 0.0}
        measured.update({k: v for k, v in reached.items() if k in measured})
        calibration = {**measured, "removed_fraction": removed_fraction(adapter, drop)}
        return LayerRecipe(self.name, recipe.model, drop, target=target, params=dict(recipe.params),
                           calibration=calibration, repair={p: recipe.repair[p] for p in drop if p in recipe.repair})
