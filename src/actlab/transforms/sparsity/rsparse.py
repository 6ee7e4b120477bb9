"""rsparse: R-Sparse (Zhang et al., ICLR 2025) - rank-aware activation sparsity. The input channels with the
largest |x_i| go through the weight exactly; the rest are not dropped but sent through a rank-r SVD
approximation of the same weight:

    y = W (x * keep) + U_r S_r V_r^T (x * ~keep).

Reading the factors costs r (in + out) weights, so at an effective budget s a projection drops the fraction
s + r (in + out) / (in out) of its channels. The paper searches the split between sparsity and rank per
layer with an evolutionary search on the final loss; here each projection picks, from a few candidate
ranks, the one whose split gives the smallest output error on calibration inputs (one pass, no search).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actlab.transforms.sparsity.attach import lowrank_factors
from actlab.transforms.sparsity.base import Sparsifier
from actlab.transforms.sparsity.budget import lowrank_cost, projection_keys, projection_shapes, projection_view
from actlab.transforms.sparsity.recipe import MaskRule, build_recipe


def split_error(samples: torch.Tensor, weight: torch.Tensor, us: torch.Tensor, vt: torch.Tensor,
                threshold: float) -> float:
    """Mean squared output error of dropping |x| <= threshold and sending the dropped part through us @ vt."""
    dropped = samples * (samples.abs() <= threshold)
    error = dropped @ weight.T - (dropped @ vt.T) @ us.T
    return float(error.pow(2).sum(-1).mean())


@dataclass
class RSparse(Sparsifier):
    rank_fractions: tuple[float, ...] = (0.0, 1 / 64, 1 / 32, 1 / 16, 1 / 8)  # of min(in, out)
    sample_tokens: int = 512
    name = "rsparse"
    paper = "R-Sparse (Zhang et al., 2025): top-|x| channels exact, the rest through a rank-r SVD of W"

    def calibrate(self, calib, target):
        lm = calib.lm
        keys = projection_keys(lm.adapter)
        shapes = projection_shapes(lm.adapter)
        hists = calib.score_histograms(dict.fromkeys(keys))
        samples = calib.input_samples(keys, self.sample_tokens)
        rules, predicted = {}, {}
        for key in keys:
            weight = projection_view(lm.adapter, key).weight().detach().float()
            best = None
            ranks = sorted({round(f * min(shapes[key])) for f in self.rank_fractions})
            for rank in [r for r in ranks if target + lowrank_cost(r, shapes[key]) < 1.0] or [0]:
                fraction = target + lowrank_cost(rank, shapes[key]) if target > 0 else 0.0
                threshold = hists[key].threshold_for(fraction)
                us, vt = lowrank_factors(lm, key, rank)
                error = split_error(samples[key], weight, us, vt, threshold)
                if best is None or error < best[0]:
                    best = (error, rank, threshold)
            _, rank, threshold = best
            rules[key] = MaskRule(threshold=threshold, rank=rank)
            predicted[key] = hists[key].dropped_at(threshold)
        return build_recipe(self, calib, target, rules, predicted)
