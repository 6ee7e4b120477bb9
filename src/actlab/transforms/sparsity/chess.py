"""chess: CHESS (He et al., 2024) - channel-wise thresholds for the FFN and selective attention sparsity.

FFN: dropping neuron i changes the output by W_down[:, i] * act_i * up_i; with up_i unknown before it is
computed, its expected size sqrt(E[up_i^2]) weights the score: score_i = |act_i| * sqrt(E[up_i^2]), one
threshold per layer (per-channel thresholds on |act_i|). The dropped neurons skip their up rows and down
columns. Attention: only the inputs of the q and o projections are sparsified (tensor-wise thresholds).
All sparsified projections drop the same fraction, chosen to meet the effective budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actlab.models.keys import split_key
from actlab.transforms.sparsity.allocation import subset_fraction
from actlab.transforms.sparsity.base import Sparsifier
from actlab.transforms.sparsity.budget import projection_keys, projection_params
from actlab.transforms.sparsity.recipe import MaskRule, build_recipe


@dataclass
class Chess(Sparsifier):
    name = "chess"
    paper = "CHESS (He et al., 2024): channel-wise FFN thresholds weighted by E[up^2]; thresholds on q and o inputs"

    def calibrate(self, calib, target):
        adapter = calib.lm.adapter
        attn = projection_keys(adapter, ("q", "qkv", "o"))
        downs = projection_keys(adapter, ("down",))
        skipped = attn + downs + projection_keys(adapter, ("up",))
        fraction = subset_fraction(target, projection_params(adapter), skipped, self.name)
        gated = adapter.layers[0].gated_mlp
        mean_sq = calib.channel_mean_sq("up") if gated else {}
        weights = {k: (mean_sq[split_key(k)[0]].sqrt().float() if gated else None) for k in downs}
        ffn = calib.score_histograms(weights, source="act")
        att = calib.score_histograms({k: None for k in attn})
        rules = {k: MaskRule(threshold=att[k].threshold_for(fraction)) for k in attn}
        predicted = {k: att[k].dropped_at(rules[k].threshold) for k in attn}
        for k in downs:
            scale = None if weights[k] is None else torch.as_tensor(weights[k]).tolist()
            rules[k] = MaskRule(threshold=ffn[k].threshold_for(fraction), scale=scale, source="act")
            predicted[k] = ffn[k].dropped_at(rules[k].threshold)
        return build_recipe(self, calib, target, rules, predicted)
