"""layerwise: the layer-importance ranking baseline of mixed precision (Dumitru et al. 2024, "Layer-Wise
Quantization: A Pragmatic and Effective Method for Quantizing LLMs Beyond Integer Bit-Levels").

Layers are ranked by their importance, 1 - E cos(layer input, layer output) (the paper's LIM score, ShortGPT's
block influence); the most important layers get the higher of two precisions, the rest the lower, with as many
high layers as the average-bits budget allows. Every projection of a layer shares its layer's precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from actlab.errors import ConfigError
from actlab.models.keys import layer_of
from actlab.transforms.layers.importance import depth_statistics
from actlab.transforms.quant.base import QuantMethod
from actlab.transforms.quant.grid import Grid
from actlab.transforms.quant.mixed import QUANTIZERS, check_budget, quantize_grids
from actlab.transforms.quant.recipe import HEAD, QuantRecipe


def layer_bits(importance: list[float], params: list[int], avg_bits: float, low: int, high: int) -> list[int]:
    """`high` bits for the most important layers, `low` for the rest, as many high as fit in the budget."""
    order = sorted(range(len(importance)), key=lambda i: (-importance[i], i))
    bits = [low] * len(importance)
    budget = avg_bits * sum(params)
    for i in order:
        if sum(p * b for p, b in zip(params, bits)) + params[i] * (high - low) <= budget + 1e-9:
            bits[i] = high
    return bits


@dataclass
class LayerWise(QuantMethod):
    name = "layerwise"
    paper = "Dumitru et al. 2024, Layer-Wise Quantization (arXiv:2406.17415)"
    mixed = True
    low: int = 0  # 0: the whole bits below the budget
    high: int = 0  # 0: the whole bits above it
    quantizer: str = "rtn"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got {self.quantizer!r}")

    def params(self) -> dict[str, Any]:
        return {**super().params(), "low": self.low, "high": self.high, "quantizer": self.quantizer}

    def calibrate(self, calib: Any, target: float | None = None) -> QuantRecipe:
        if target is None:
            raise ConfigError("layer-wise mixed precision needs --avg-bits (the average code bits per weight)")
        low = self.low or max(2, math.floor(target))
        high = self.high or min(8, max(low + 1, math.ceil(target)))
        Grid(low), Grid(high)
        avg = check_budget(target, (low, high))
        lm = calib.lm
        self.check_grid(lm)
        views = self.targets(lm)
        importance = depth_statistics(calib).block_influence.tolist()
        params = [sum(v.num_params for k, v in views.items() if layer_of(k) == i) for i in range(len(importance))]
        bits = layer_bits(importance, params, avg, low, high)
        grids = {k: Grid(bits[layer_of(k)] if k != HEAD else high, self.group, self.symmetric) for k in views}
        quantized = quantize_grids(self, calib, grids, self.quantizer)
        return self.recipe(calib, quantized.weights, {"layer_bits": bits, "importance": importance}, target=avg)
