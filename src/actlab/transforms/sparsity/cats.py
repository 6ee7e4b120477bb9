"""cats: CATS (Lee et al., 2024) - threshold |act(gate(x))| per layer; the gate projection stays dense, and
the dropped neurons skip both their up-projection rows and their down-projection columns."""

from __future__ import annotations

from dataclasses import dataclass

from actlab.transforms.sparsity.allocation import subset_fraction
from actlab.transforms.sparsity.base import Sparsifier
from actlab.transforms.sparsity.budget import projection_keys, projection_params
from actlab.transforms.sparsity.recipe import MaskRule, build_recipe


@dataclass
class Cats(Sparsifier):
    name = "cats"
    paper = "CATS (Lee et al., 2024): threshold on |act(gate)| only; gate dense, up rows and down columns skipped"

    def calibrate(self, calib, target):
        adapter = calib.lm.adapter
        downs = projection_keys(adapter, ("down",))
        skipped = downs + projection_keys(adapter, ("up",))
        fraction = subset_fraction(target, projection_params(adapter), skipped, self.name)
        hists = calib.score_histograms({k: None for k in downs}, source="act")
        rules = {k: MaskRule(threshold=hists[k].threshold_for(fraction), source="act") for k in downs}
        return build_recipe(self, calib, target, rules, {k: hists[k].dropped_at(rules[k].threshold) for k in downs})
