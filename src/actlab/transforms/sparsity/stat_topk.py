"""stat-topk: statistical top-k (Spark Transformer, Gemma 3n) - no fixed thresholds: each token drops the
channels whose score |x_i| falls below mean + z * std of its own scores, a Gaussian estimate of the k-th
largest. With `calibrated=True` (default) z is fitted per projection on calibration data so the budget is
met; `calibrated=False` uses the pure Gaussian z = Phi^-1(s)."""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

from actlab.transforms.sparsity.base import Sparsifier
from actlab.transforms.sparsity.budget import projection_keys
from actlab.transforms.sparsity.recipe import MaskRule, build_recipe
from actlab.transforms.sparsity.scores import Z_EDGES, z_for_fraction


@dataclass
class StatTopK(Sparsifier):
    calibrated: bool = True
    name = "stat-topk"
    paper = "statistical top-k (Spark Transformer / Gemma 3n): per-token cutoff mean + std * z, z = Phi^-1(s)"

    def calibrate(self, calib, target):
        keys = projection_keys(calib.lm.adapter)
        hists = calib.standardized_histograms(keys)
        if self.calibrated:
            zs = {k: z_for_fraction(hists[k], target) for k in keys}
        else:
            z = NormalDist().inv_cdf(min(max(target, 1e-9), 1 - 1e-9))
            zs = dict.fromkeys(keys, z)
        rules = {k: MaskRule(kind="gaussian", z=zs[k]) for k in keys}
        predicted = {k: _fraction_below(hists[k], zs[k]) for k in keys}
        return build_recipe(self, calib, target, rules, predicted)


def _fraction_below(counts, z: float) -> float:
    import numpy as np

    cum = np.concatenate([[0.0], np.cumsum(counts)]) / counts.sum()
    k = int(np.clip(np.searchsorted(Z_EDGES, z), 0, len(Z_EDGES) - 1))
    return float(cum[k])
