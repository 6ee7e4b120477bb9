"""PPL-p% sparsity (Luo et al., 2024, "Sparsing Law"): the highest FFN activation sparsity at which
perplexity stays within p% of dense, with the CETT criterion.

For an FFN intermediate activation a (the input of down_proj, W = W_down), neuron i contributes
n_i = a_i * W[:, i] to the output. With threshold eps, the neurons with ||n_i|| = |a_i| * ||W[:, i]|| < eps
are dropped, and the cumulative error of tail truncation is

    CETT = || sum_{dropped} n_i || / || sum_i n_i ||   (per token, averaged).

Each layer gets the eps whose mean CETT on calibration tokens equals a common c (bisection); c itself is
found by bisection so that perplexity on the evaluation windows is (1 + p/100) x dense. The reported
sparsity is the fraction of FFN neurons dropped (the Sparsing Law's activation sparsity); the effective
sparsity of the budget definition (down-projection columns only) is reported too.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from actlab.eval.perplexity import perplexity
from actlab.models.keys import projection_key, split_key
from actlab.progress import track
from actlab.transforms.sparsity.budget import projection_params
from actlab.transforms.sparsity.harness import evaluate
from actlab.transforms.sparsity.recipe import MaskRule, SparsityRecipe, model_fingerprint

BISECTION_STEPS = 22


@dataclass
class CettLayer:
    activations: torch.Tensor  # [tokens, neurons]
    norms: torch.Tensor  # ||W[:, i]||
    weight: torch.Tensor  # W_down [hidden, neurons]
    full_norm: torch.Tensor  # ||W a|| per token

    @functools.cached_property
    def contribution(self) -> torch.Tensor:
        """||n_i|| = |a_i| * ||W[:, i]|| per token and neuron (fixed; every bisection step reuses it)."""
        return self.activations.abs() * self.norms

    def cett(self, eps: float) -> float:
        dropped = self.activations * (self.contribution < eps)
        return float(((dropped @ self.weight.t()).norm(dim=-1) / self.full_norm.clamp_min(1e-30)).mean())

    def threshold_for(self, c: float) -> float:
        lo, hi = 0.0, float(self.contribution.max()) * 1.0001
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.cett(mid) < c else (lo, mid)
        return lo


def collect_layers(calib, tokens: int = 2048) -> list[CettLayer]:
    lm = calib.lm
    seq = calib.windows.shape[1]
    ids = calib.windows[: max(1, math.ceil(tokens / seq))]
    stored: dict[int, list[torch.Tensor]] = {}
    handles = [layer.linears["down"].module.register_forward_pre_hook(
        lambda m, args, i=layer.index: stored.setdefault(i, []).append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for layer in lm.adapter.layers]
    try:
        with torch.no_grad():
            for w in ids:
                lm.model(input_ids=w[None].to(lm.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    layers = []
    for layer in lm.adapter.layers:
        a = torch.cat(stored[layer.index])[:tokens].float()
        w = layer.linears["down"].weight().detach().float()
        layers.append(CettLayer(a, w.norm(dim=0), w, (a @ w.t()).norm(dim=-1)))
    return layers


def recipe_for(calib, layers: list[CettLayer], c: float) -> SparsityRecipe:
    lm = calib.lm
    rules = {projection_key(i, "down"): MaskRule(threshold=layer.threshold_for(c), scale=layer.norms.tolist())
             for i, layer in enumerate(layers)}
    return SparsityRecipe("cett", 0.0, model_fingerprint(lm.adapter, lm.name), rules, params={"cett": c},
                          calibration=calib.describe())


def sparsity_at_ppl(calib, eval_windows: torch.Tensor, p: float = 1.0, steps: int = 8, tokens: int = 2048,
                    progress: bool = True) -> dict[str, Any]:
    lm = calib.lm
    dense = perplexity(lm, eval_windows, batch_size=1, progress=False).ppl
    limit = dense * (1 + p / 100)
    layers = collect_layers(calib, tokens)
    lo, hi = 0.0, 1.0
    best = None
    for _ in track(range(steps), total=steps, description="ppl-p% search", enabled=progress):
        c = (lo + hi) / 2
        recipe = recipe_for(calib, layers, c)
        result = evaluate(lm, recipe, eval_windows, progress=False)
        if result.sparse_ppl <= limit:
            lo, best = c, (c, recipe, result)
        else:
            hi = c
    if best is None:
        c, recipe = 0.0, recipe_for(calib, layers, 0.0)
        result = evaluate(lm, recipe, eval_windows, progress=False)
    else:
        c, recipe, result = best
    neurons = sum(result.dropped.values()) / max(1, len(result.dropped))
    params = projection_params(lm.adapter)
    return {"model": lm.name, "p": p, "dense_ppl": dense, "ppl": result.sparse_ppl, "ppl_limit": limit, "cett": c,
            "activation_sparsity": neurons, "effective_sparsity": result.achieved_sparsity,
            "down_share_of_linear_params":
                sum(v for k, v in params.items() if k.endswith(".down")) / sum(params.values()),
            "per_layer_activation_sparsity": {k: v for k, v in sorted(result.dropped.items(),
                                                                        key=lambda kv: split_key(kv[0])[0])}}
