"""teal: TEAL (Liu et al., ICLR 2025) - magnitude thresholds on the input of every projection, each from
its calibration histogram, with the paper's greedy block-wise allocation.

Greedy allocation, per decoder layer: start every projection at sparsity 0; at each step, try raising each
projection by `step / w_p` (w_p: its parameter count relative to q, so every step adds the same amount of
parameter-weighted sparsity), re-run the layer on calibration inputs, and keep the one raise whose layer
output moves least (mean L2 over positions); stop at `max_level`. The steps form a lookup table from a
layer's effective sparsity to per-projection sparsities; a target reads off the closest row. With
`greedy=False` every projection simply drops the target fraction (TEAL's uniform variant).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actlab.progress import track
from actlab.transforms.sparsity.attach import attach
from actlab.transforms.sparsity.base import Sparsifier
from actlab.transforms.sparsity.budget import projection_keys
from actlab.transforms.sparsity.recipe import MaskRule, SparsityRecipe, build_recipe, model_fingerprint


def _layer_output(module, call) -> torch.Tensor:
    args, kwargs = call
    out = module(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@dataclass
class Teal(Sparsifier):
    greedy: bool = True
    step: float = 0.05
    tokens: int = 512
    max_level: float = 0.7
    name = "teal"
    paper = "TEAL (Liu et al., ICLR 2025): magnitude thresholds per projection input, greedy block-wise allocation"

    def calibrate(self, calib, target):
        keys = projection_keys(calib.lm.adapter)
        hists = calib.score_histograms({k: None for k in keys})
        if self.greedy:
            table = self.greedy_table(calib, hists, max(self.max_level, target))
            fractions = {}
            for layer, rows in enumerate(table):
                best = min(rows, key=lambda row: abs(row[0] - target))
                fractions.update({f"L{layer}.{role}": f for role, f in best[1].items()})
        else:
            fractions = dict.fromkeys(keys, target)
        rules = {k: MaskRule(threshold=hists[k].threshold_for(fractions[k])) for k in keys}
        return build_recipe(self, calib, target, rules, {k: hists[k].dropped_at(rules[k].threshold) for k in keys})

    def greedy_table(self, calib, hists, max_level: float) -> list[list[tuple[float, dict[str, float]]]]:
        adapter = calib.lm.adapter
        roles = list(adapter.layers[0].linears)
        extra = [self.step, self.tokens, round(max_level, 4)]
        raw = calib._cached("teal-greedy", extra, lambda: self._compute_table(calib, hists, max_level, roles))
        table = []
        for layer in range(adapter.num_layers):
            rows = raw[f"L{layer}"].tolist()
            table.append([(row[0], dict(zip(roles, row[1:]))) for row in rows])
        return table

    @torch.no_grad()
    def _compute_table(self, calib, hists, max_level, roles) -> dict[str, torch.Tensor]:
        lm = calib.lm
        calls = calib.layer_replay(self.tokens)
        base = lm.adapter.layers[0].linears["q" if "q" in roles else roles[0]].num_params
        fingerprint = model_fingerprint(lm.adapter, lm.name)
        out: dict[str, torch.Tensor] = {}
        for layer in track(lm.adapter.layers, total=lm.adapter.num_layers, description="teal greedy"):
            weight = {r: layer.linears[r].num_params / base for r in roles}
            step = {r: self.step / weight[r] for r in roles}
            dense = _layer_output(layer.module, calls[layer.index])

            def error(fractions: dict[str, float]) -> float:
                rules = {f"L{layer.index}.{r}": MaskRule(threshold=hists[f"L{layer.index}.{r}"].threshold_for(f))
                         for r, f in fractions.items() if f > 0}
                recipe = SparsityRecipe("teal-greedy", 0.0, fingerprint, rules)
                with attach(lm, recipe):
                    moved = _layer_output(layer.module, calls[layer.index])
                return float((moved - dense).norm(dim=-1).mean())

            def level(fractions):
                return sum(weight[r] * fractions[r] for r in roles) / sum(weight.values())

            fractions = dict.fromkeys(roles, 0.0)
            rows = [[0.0] + [0.0] * len(roles)]
            while level(fractions) < max_level:
                trials = {r: {**fractions, r: min(1.0, fractions[r] + step[r])} for r in roles if fractions[r] < 1.0}
                best = min(trials, key=lambda r: error(trials[r]))
                fractions = trials[best]
                rows.append([level(fractions)] + [fractions[r] for r in roles])
            out[f"L{layer.index}"] = torch.tensor(rows, dtype=torch.float64)
        return out
