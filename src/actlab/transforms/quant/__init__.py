"""Weight quantization: one file per method behind `QuantMethod`, the grid math in grid.py, the recipe in
recipe.py (codes and scales, attached as exact weight swaps)."""

from __future__ import annotations

from actlab.transforms.base import make_method
from actlab.transforms.quant.awq import AWQ
from actlab.transforms.quant.base import NoCalibration, QuantMethod
from actlab.transforms.quant.gptq import GPTQ
from actlab.transforms.quant.grid import Grid, Quantized, fake_quantize, quantize
from actlab.transforms.quant.layerwise import LayerWise
from actlab.transforms.quant.mixed import MixedPrecision
from actlab.transforms.quant.recipe import QuantRecipe
from actlab.transforms.quant.rtn import RTN
from actlab.transforms.quant.smoothquant import SmoothQuant

METHODS: dict[str, type[QuantMethod]] = {cls.name: cls for cls in (RTN, AWQ, GPTQ, SmoothQuant, MixedPrecision,
                                                                  LayerWise)}


def get_method(name: str, **params) -> QuantMethod:
    return make_method(METHODS, "quantization", name, **params)  # type: ignore[return-value]


__all__ = ["METHODS", "Grid", "NoCalibration", "QuantMethod", "QuantRecipe", "Quantized", "fake_quantize", "get_method",
           "quantize"]
