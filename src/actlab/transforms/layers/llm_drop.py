"""LLM-Drop (He et al. 2024, "What Matters in Transformers? Not All Attention Is Needed"): remove the attention
(or MLP) sublayers whose output changes the residual stream least, importance = 1 - E cos(x, x + f(x)) over
calibration tokens, one-shot. Attention sublayers hold a small share of the parameters, so a large budget may
be out of reach of attention dropping alone (a clear error says how far it gets)."""

from __future__ import annotations

from typing import Any, ClassVar

from actlab.errors import ConfigError
from actlab.models.keys import layer_key
from actlab.transforms.layers.base import LayerMethod
from actlab.transforms.layers.importance import depth_statistics, take_until


class AttentionDrop(LayerMethod):
    name = "attn-drop"
    paper = "He et al. 2024, What Matters in Transformers? Not All Attention Is Needed (arXiv:2406.15786)"
    removes = "attention sublayers"
    sublayer: ClassVar[str] = "attn"

    def choose(self, calib: Any, target: float, start: None = None):
        stats = depth_statistics(calib)
        influence = (stats.attn_influence if self.sublayer == "attn" else stats.mlp_influence).tolist()
        if any(v != v for v in influence):
            raise ConfigError(f"{self.name} needs the stream between the sublayers, which a parallel residual "
                              "(GPT-NeoX) does not have; use shortgpt, sleb or joint")
        order = sorted(range(len(influence)), key=lambda i: (influence[i], i))
        drop = take_until([f"{layer_key(i)}.{self.sublayer}" for i in order], calib.lm.adapter, target,
                          f"removing {self.removes}")
        return self.recipe(calib, target, drop, {f"{self.sublayer}_influence": influence})


class MLPDrop(AttentionDrop):
    name = "mlp-drop"
    removes = "MLP sublayers"
    sublayer = "mlp"
