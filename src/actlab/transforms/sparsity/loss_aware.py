"""loss-aware: actlab's own method - drop the channels whose expected loss cost per skipped weight is
smallest, with one threshold shared by every projection of every layer. See docs/loss-aware.md.

Derivation. Zeroing input channel i of projection l (weights W_l, input x, output gradient d = dL/dy)
changes the loss by about  dL ~ -x_i (W_l^T d)_i + 1/2 (x_i (W_l^T d)_i)^2 ; at a trained model the
first-order term averages out, and with a diagonal (empirical) Fisher the expected cost is
1/2 x_i^2 g_{l,i}^2, where g_{l,i} = RMS over calibration tokens of (W_l^T d)_i - the gradient reaching
x_i through projection l only. Skipping the channel saves out_l weights (one column). Minimising the
total cost under a budget on skipped weights (Lagrangian, per token) gives a single rule for all
projections:

    drop x_i of projection l  iff  |x_i| * g_{l,i} / sqrt(out_l) < tau,

with tau set by bisection so that the effective sparsity meets the target. Unlike TEAL (uniform or
block-local allocation) and WINA (||W[:, i]||, blind to what happens downstream), the gradient carries
every downstream layer's sensitivity, so the budget flows to the layers and channels where dropping
costs the least loss.

Options: `compensate` adds to each projection's output the calibration mean of the dropped
contribution, W_l E[x * (1 - keep)] (a bias, free at decode time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from actlab.transforms.sparsity.allocation import global_threshold
from actlab.transforms.sparsity.base import MaskRule, Sparsifier, build_recipe, projection_keys, projection_params


@dataclass
class LossAware(Sparsifier):
    grad_windows: int = 8
    name = "loss-aware"
    paper = "actlab: score |x_i|*RMS(dL/dx_i)/sqrt(fan-out), one global threshold over every layer and projection"

    def scales(self, calib) -> dict[str, torch.Tensor]:
        adapter = calib.lm.adapter
        grads = calib.input_grad_rms(self.grad_windows)
        outs = {f"L{layer.index}.{role}": lin.out_features for layer in adapter.layers
                for role, lin in layer.linears.items()}
        return {k: grads[k] / math.sqrt(outs[k]) for k in projection_keys(adapter)}

    def calibrate(self, calib, target):
        adapter = calib.lm.adapter
        scales = self.scales(calib)
        hists = calib.score_histograms(scales)
        t = global_threshold(hists, projection_params(adapter), target)
        rules = {k: MaskRule(threshold=t, scale=scales[k].tolist()) for k in scales}
        return build_recipe(self, calib, target, rules, {k: hists[k].dropped_at(t) for k in scales})
