"""RTN: round to nearest on the grid, each group's scale fitted to its range (no calibration data).

The baseline every quantization paper compares against; with groups of 32, asymmetric and 4 bits it is
GGUF's Q4_1 (and symmetric, Q4_0) exactly, up to their float16 scales."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actlab.progress import track
from actlab.transforms.quant.base import QuantMethod
from actlab.transforms.quant.grid import Grid, quantize
from actlab.transforms.quant.recipe import QuantRecipe, entry


def rtn_weights(views: dict[str, Any], grids: dict[str, Grid], progress: bool = False) -> dict[str, dict[str, Any]]:
    """Recipe entries for `views` rounded to nearest on their grids."""
    return {key: entry(quantize(views[key].weight().detach().float(), grids[key]))
            for key in track(list(views), total=len(views), description="rtn", enabled=progress)}


@dataclass
class RTN(QuantMethod):
    name = "rtn"
    paper = "round to nearest (the baseline of GPTQ, AWQ and GGUF's Q4_0 / Q4_1 / Q8_0)"
    calibrated = False

    def calibrate(self, calib: Any, target: float | None = None) -> QuantRecipe:
        lm = calib.lm
        self.check_grid(lm)
        views = self.targets(lm)
        weights = rtn_weights(views, dict.fromkeys(views, self.grid()), self.progress)
        return self.recipe(calib, weights)
