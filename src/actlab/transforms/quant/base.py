"""The protocol every weight-quantization method implements (the quant family's `Method`).

A method quantizes every projection of every decoder layer (and the LM head when `head` is set) onto a grid
(`grid.py`: bits, group size, symmetric or not) and returns a `QuantRecipe` with the codes. Calibration-free
methods (RTN) are given `NoCalibration(lm)` instead of a calibration set. `target` is the average code bits asked
for: uniform methods take it from their grid, mixed-precision methods allocate it.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from actlab.models.keys import projection_key
from actlab.transforms.base import Method, NoCalibration  # noqa: F401  (re-exported)
from actlab.transforms.quant.grid import Grid
from actlab.transforms.quant.recipe import HEAD, QuantRecipe, target_view

# Projections that read one input tensor, in the order a layer computes them: what GPTQ quantizes together
# (true-sequential) and what AWQ and SmoothQuant scale together.
INPUT_GROUPS = (("q", "k", "v", "qkv"), ("o",), ("gate", "up"), ("down",))


def input_groups(layer: Any) -> list[list[str]]:
    """The roles of `layer` (a LayerView) grouped by the input they read, in computation order."""
    return [[r for r in group if r in layer.linears] for group in INPUT_GROUPS if any(r in layer.linears
                                                                                      for r in group)]


@dataclass
class QuantMethod(Method):
    family = "quant"
    name: ClassVar[str]
    paper: ClassVar[str]
    calibrated: ClassVar[bool] = True  # needs calibration data
    mixed: ClassVar[bool] = False  # allocates bits per projection to an average
    bits: int = 4
    group: int = 64  # divides the widths of nearly every model (SmolLM2's 576, Gemma-3's 640); 128 often not
    symmetric: bool = False
    head: bool = False  # quantize the LM head too
    progress: bool = False

    def __post_init__(self) -> None:
        Grid(self.bits, self.group, self.symmetric)  # bad bits or group: a one-line error before any work

    def grid(self) -> Grid:
        return Grid(self.bits, self.group, self.symmetric)

    def targets(self, lm: Any) -> dict[str, Any]:
        """The LinearViews to quantize, by key (every projection; the LM head when `head`)."""
        out = {projection_key(layer.index, role): view for layer in lm.adapter.layers
               for role, view in layer.linears.items()}
        if self.head:
            out[HEAD] = target_view(lm, HEAD)
        return out

    def check_grid(self, lm: Any, grids: dict[str, Grid] | None = None) -> None:
        """Every target's input channels divide into its grid's groups (one line naming the first that does not)."""
        for key, view in self.targets(lm).items():
            (grids or {}).get(key, self.grid()).group_size(view.in_features, key)

    def params(self) -> dict[str, Any]:
        return {"bits": self.bits, "group": self.group, "symmetric": self.symmetric, "head": self.head}

    @abstractmethod
    def calibrate(self, calib: Any, target: float | None = None) -> QuantRecipe:
        """Quantize `calib.lm` (calib: a CalibrationSet, or NoCalibration for calibration-free methods)."""

    def recipe(self, calib: Any, weights: dict[str, dict[str, Any]], measured: dict[str, Any] | None = None,
               target: float | None = None) -> QuantRecipe:
        lm = calib.lm
        recipe = QuantRecipe(self.name, lm.identity.to_dict(), weights, params=self.params(),
                             calibration={**calib.describe(), **(measured or {})})
        recipe.target = float(target if target is not None else recipe.average_bits())
        return recipe
