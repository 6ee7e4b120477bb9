"""ShortGPT (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect"):
remove the blocks with the lowest Block Influence, BI = 1 - E cos(block input, block output)."""

from __future__ import annotations

from typing import Any

from actlab.models.keys import layer_key
from actlab.transforms.layers.base import LayerMethod
from actlab.transforms.layers.importance import depth_statistics, take_until


class ShortGPT(LayerMethod):
    name = "shortgpt"
    paper = "Men et al. 2024, ShortGPT (arXiv:2403.03853)"
    removes = "blocks"

    def choose(self, calib: Any, target: float, start: None = None):
        bi = depth_statistics(calib).block_influence.tolist()
        order = sorted(range(len(bi)), key=lambda i: (bi[i], i))
        drop = take_until([layer_key(i) for i in order], calib.lm.adapter, target, "removing blocks")
        return self.recipe(calib, target, drop, {"block_influence": bi})
