"""wina: WINA (Chen et al., 2025) - score each input channel by |x_i| * ||W[:, i]||_2, the size of its
contribution to the projection's output; per-projection thresholds at the target fraction (or an exact
per-token top-k with `topk=True`)."""

from __future__ import annotations

from dataclasses import dataclass

from actlab.transforms.sparsity.base import Sparsifier
from actlab.transforms.sparsity.budget import projection_keys
from actlab.transforms.sparsity.recipe import MaskRule, build_recipe


def column_norms(calib) -> dict[str, "torch.Tensor"]:  # noqa: F821
    return {f"L{layer.index}.{role}": lin.weight().detach().float().norm(dim=0).cpu()
            for layer in calib.lm.adapter.layers for role, lin in layer.linears.items()}


@dataclass
class Wina(Sparsifier):
    topk: bool = False
    name = "wina"
    paper = "WINA (Chen et al., 2025): score |x_i|*||W[:,i]||_2, per-projection thresholds (topk=True: per-token top-k)"

    def calibrate(self, calib, target):
        keys = projection_keys(calib.lm.adapter)
        norms = column_norms(calib)
        if self.topk:
            rules = {k: MaskRule(kind="topk", keep=1.0 - target, scale=norms[k].tolist()) for k in keys}
            predicted = {k: 1.0 - round((1.0 - target) * len(norms[k])) / len(norms[k]) for k in keys}
            return build_recipe(self, calib, target, rules, predicted)
        hists = calib.score_histograms({k: norms[k] for k in keys})
        rules = {k: MaskRule(threshold=hists[k].threshold_for(target), scale=norms[k].tolist()) for k in keys}
        return build_recipe(self, calib, target, rules, {k: hists[k].dropped_at(rules[k].threshold) for k in keys})
