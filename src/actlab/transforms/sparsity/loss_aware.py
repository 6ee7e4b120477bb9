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

Two choices the derivation leaves open are settled per model by the measured calibration loss:
- the sensitivity estimate: the plain mean square of the gradient, or a typical token's (a few tokens, the
  attention sinks, can own the mean square: on Gemma-3 over 90% of many projections' gradient energy);
- the rule: the shared threshold tau; or per-token top-k at the fraction tau allocates to each projection
  (a per-token cutoff follows tokens whose activations are uniformly larger or smaller); or, between the
  two, a relative threshold per projection - drop x_i iff its score is below r_l times the RMS of the
  token's scores, r_l set so the projection drops its allocated fraction on calibration data (scale-free
  like top-k, but a token whose scores are spread unevenly drops more or fewer channels).
Each of the (up to) six candidate recipes is scored by the next-token loss on `select_windows`
calibration windows with it attached; the lowest wins and is recorded in the recipe.

The allocation is then shrunk toward uniform: projection l drops (1 - b) f_l + b * target, which keeps the
budget (the f_l average to the target, weighted by parameters). The quadratic cost model adds the costs
of dropped channels independently, so it concentrates the budget in the cheapest projections; the real
loss grows faster than that once a projection loses a large share of its input. b is chosen from
`SHRINKAGES` by the same calibration loss, for the winning variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from actlab.errors import ConfigError
from actlab.transforms.sparsity.allocation import global_threshold
from actlab.transforms.sparsity.base import Sparsifier
from actlab.transforms.sparsity.budget import projection_keys, projection_params
from actlab.transforms.sparsity.recipe import MaskRule, SparsityRecipe, build_recipe

SENSITIVITIES = ("mean-square", "typical")
RULES = ("threshold", "topk", "relative")
SHRINKAGES = (0.0, 0.25, 0.5, 0.75)  # toward the uniform allocation


def calibration_loss(calib, recipe: SparsityRecipe, windows: torch.Tensor) -> float:
    """Mean next-token loss on `windows` with `recipe` attached."""
    from actlab.eval.perplexity import perplexity
    from actlab.transforms.sparsity.attach import attach

    with attach(calib.lm, recipe):
        return perplexity(calib.lm, windows, batch_size=1, progress=False).nll


@dataclass
class LossAware(Sparsifier):
    grad_windows: int = 8
    sensitivity: str = "auto"  # "mean-square" | "typical" | "auto"
    rule: str = "auto"  # "threshold" | "topk" | "relative" | "auto"
    select_windows: int = 2  # calibration windows scoring the candidates (the last ones)
    toward_uniform: float | str = "auto"  # shrinkage b of the allocation toward uniform, in [0, 1]; or "auto"
    name = "loss-aware"
    paper = ("actlab: score |x_i|*RMS(dL/dx_i)/sqrt(fan-out), one global threshold over every layer and projection "
             "(or a per-token top-k or relative cutoff at its allocation), variant chosen by calibration loss")

    def __post_init__(self):
        if self.sensitivity not in (*SENSITIVITIES, "auto") or self.rule not in (*RULES, "auto"):
            raise ConfigError(f"loss-aware: sensitivity must be one of {SENSITIVITIES} or auto, rule one of {RULES} "
                              "or auto")
        b = self.toward_uniform
        if b != "auto" and not (isinstance(b, (int, float)) and 0.0 <= b <= 1.0):
            raise ConfigError(f"loss-aware: toward_uniform must be in [0, 1] or auto, got {b!r}")

    def scales(self, calib, sensitivity: str = "mean-square") -> dict[str, torch.Tensor]:
        adapter = calib.lm.adapter
        grads = calib.input_grad_rms(self.grad_windows, robust=sensitivity == "typical")
        outs = {f"L{layer.index}.{role}": lin.out_features for layer in adapter.layers
                for role, lin in layer.linears.items()}
        return {k: grads[k] / math.sqrt(outs[k]) for k in projection_keys(adapter)}

    def candidate(self, calib, target: float, sensitivity: str, rule: str,
                  toward_uniform: float = 0.0) -> SparsityRecipe:
        scales = self.scales(calib, sensitivity)
        hists = calib.score_histograms(scales)
        t = global_threshold(hists, projection_params(calib.lm.adapter), target)
        dropped = {k: hists[k].dropped_at(t) for k in scales}
        thresholds = dict.fromkeys(scales, t)
        if toward_uniform:
            dropped = {k: (1.0 - toward_uniform) * f + toward_uniform * target for k, f in dropped.items()}
            thresholds = {k: hists[k].threshold_for(f) for k, f in dropped.items()}
        if rule == "topk":
            rules = {k: MaskRule(kind="topk", keep=1.0 - dropped[k], scale=scales[k].tolist()) for k in scales}
        elif rule == "relative":
            relative = calib.score_histograms(scales, relative=True)
            rules = {k: MaskRule(kind="relative", threshold=relative[k].threshold_for(dropped[k]),
                                 scale=scales[k].tolist()) for k in scales}
        else:
            rules = {k: MaskRule(threshold=thresholds[k], scale=scales[k].tolist()) for k in scales}
        recipe = build_recipe(self, calib, target, rules, dropped)
        recipe.calibration["choice"] = {"sensitivity": sensitivity, "rule": rule, "toward_uniform": toward_uniform}
        return recipe

    def calibrate(self, calib, target):
        chosen = calib.under.calibration.get("choice") if calib.under is not None else None
        if chosen is not None:  # a refinement step keeps the variant chosen before it
            return self.candidate(calib, target, **chosen)
        shrinkages = SHRINKAGES if self.toward_uniform == "auto" else (float(self.toward_uniform),)
        options = [(s, r, shrinkages[0]) for s in (SENSITIVITIES if self.sensitivity == "auto" else (self.sensitivity,))
                   for r in (RULES if self.rule == "auto" else (self.rule,))]
        if target == 0 or len(options) * len(shrinkages) == 1:
            return self.candidate(calib, target, *options[0])
        held = calib.windows[-self.select_windows:]
        scored: dict[tuple, tuple[float, SparsityRecipe]] = {}

        def consider(option: tuple) -> None:
            recipe = self.candidate(calib, target, *option)
            scored[option] = (calibration_loss(calib, recipe, held), recipe)

        for option in options:
            consider(option)
        sensitivity, rule, _ = min(scored, key=lambda option: scored[option][0])
        for b in shrinkages[1:]:  # the shrinkage only for the winning variant: three candidates more, not eighteen
            consider((sensitivity, rule, b))
        best = min(scored, key=lambda option: scored[option][0])
        recipe = scored[best][1]
        recipe.calibration["selection_loss"] = {f"{s}/{r}/{b:g}": loss for (s, r, b), (loss, _) in scored.items()}
        return recipe
