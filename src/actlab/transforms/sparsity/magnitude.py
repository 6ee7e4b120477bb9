"""magnitude: the naive baseline - one global |x| threshold shared by every projection input."""

from __future__ import annotations

from dataclasses import dataclass

from actlab.transforms.sparsity.allocation import global_threshold
from actlab.transforms.sparsity.base import Sparsifier
from actlab.transforms.sparsity.budget import projection_keys, projection_params
from actlab.transforms.sparsity.recipe import MaskRule, build_recipe


@dataclass
class Magnitude(Sparsifier):
    name = "magnitude"
    paper = "baseline: one global |x| threshold for every projection input"

    def calibrate(self, calib, target):
        keys = projection_keys(calib.lm.adapter)
        hists = calib.score_histograms({k: None for k in keys})
        t = global_threshold(hists, projection_params(calib.lm.adapter), target)
        rules = {k: MaskRule(threshold=t) for k in keys}
        return build_recipe(self, calib, target, rules, {k: hists[k].dropped_at(t) for k in keys})
