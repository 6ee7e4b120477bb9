"""coreinfer: CoreInfer (Wang et al., 2024) - sentence-level core neurons. Each prompt token's token-wise
core is its top-`alpha` fraction of FFN neurons by |act|; the neurons most often in those cores form the
sentence's core, chosen once at the prompt and fixed for every decoded token. Since the set is known before
the gate runs, the gate and up rows and the down columns of every other neuron are skipped; attention
stays dense. The paper keeps the neurons in at least a `beta` fraction of the token cores (a set whose size
varies by prompt); to meet a budget exactly we keep the most frequent `keep` fraction instead.

Perplexity needs a prompt: the default protocol is "last-half" (the first half of every window is the
prompt, dense; its core sparsifies the second half). Under "all", a multi-token call is all prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from actlab.transforms.sparsity.allocation import subset_fraction
from actlab.transforms.sparsity.base import Sparsifier
from actlab.transforms.sparsity.budget import projection_keys, projection_params
from actlab.transforms.sparsity.recipe import MaskRule, build_recipe


@dataclass
class CoreInfer(Sparsifier):
    alpha: float = 0.4
    positions: Literal["last-half", "all"] = "last-half"
    name = "coreinfer"
    needs_prompt = True
    paper = "CoreInfer (Wang et al., 2024): sentence-level core FFN neurons chosen at the prompt, fixed while decoding"

    def calibrate(self, calib, target):
        adapter = calib.lm.adapter
        downs = projection_keys(adapter, ("down",))
        skipped = downs + projection_keys(adapter, ("gate", "up"))
        keep = 1.0 - subset_fraction(target, projection_params(adapter), skipped, self.name)
        n = adapter.intermediate_size
        rules = {k: MaskRule(kind="core", keep=keep, alpha=self.alpha, source="act") for k in downs}
        predicted = {k: 1.0 - min(n, round(keep * n)) / n for k in downs}
        return build_recipe(self, calib, target, rules, predicted, positions=self.positions)
