"""Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers": remove the contiguous span of
n blocks whose input and output are closest, argmin_l d(x_l, x_{l+n}) with d the angular distance (n: the
fewest blocks that meet the budget). The paper heals with QLoRA afterwards; this is the training-free part."""

from __future__ import annotations

from typing import Any

from actlab.errors import ConfigError
from actlab.models.keys import layer_key
from actlab.transforms.layers.base import LayerMethod
from actlab.transforms.layers.importance import depth_statistics, removed_fraction


class Gromov(LayerMethod):
    name = "gromov"
    paper = "Gromov et al. 2024, The Unreasonable Ineffectiveness of the Deeper Layers (arXiv:2403.17887)"
    removes = "a contiguous span of blocks"

    def choose(self, calib: Any, target: float, start: None = None):
        adapter = calib.lm.adapter
        distance = depth_statistics(calib).angular
        n_layers = adapter.num_layers
        for n in range(0 if target <= 0 else 1, n_layers):
            spans = [(float(distance[start, start + n]) if n else 0.0, start) for start in range(n_layers - n + 1)
                     if removed_fraction(adapter, [layer_key(i) for i in range(start, start + n)]) >= target]
            if spans:
                best, start = min(spans)
                drop = [layer_key(i) for i in range(start, start + n)]
                return self.recipe(calib, target, drop, {"span_start": start, "span": n, "angular_distance": best})
        raise ConfigError(f"no span of fewer than all {n_layers} blocks removes {target:.1%} of the parameters")
