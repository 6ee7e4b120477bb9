"""AWQ (Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"):
protect the weights of the input channels that carry large activations by scaling them up before rounding.

Derivation. Rounding error on w_j costs in proportion to |x_j|. Multiplying input channel j of W by s_j > 1
and dividing x_j by s_j leaves W x unchanged in exact arithmetic, but the rounding error of the scaled weight
is divided by s_j on the way out (the group's scale grows less than s_j as long as j is not the group's
extreme). AWQ takes s = a^alpha, a_j = E|x_j| over calibration tokens (normalised so that max(s) min(s) = 1),
and chooses alpha on a grid by the measured output error of the projections that read that input:

    alpha* = argmin_alpha  sum_p || W_p X^T - (Q(W_p diag(s)) diag(s)^-1) X^T ||^2

Then, for every projection but q and k (whose errors the softmax amplifies, as in the paper's code), each
(output row, group)'s range is clipped by the ratio in `clip_grid` that minimises that group's output error.
The scale is kept in the recipe (`input_scale`): the projection computes with Q(W diag(s)) diag(s)^-1, which
an export folds into the weights (HF) or into the operation before the projection (GGUF). The LM head, when
quantized, is rounded to nearest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from actlab.models.keys import projection_key
from actlab.progress import track
from actlab.transforms.quant.base import QuantMethod, input_groups
from actlab.transforms.quant.grid import Grid, fake_quantize, quantize
from actlab.transforms.quant.recipe import HEAD, QuantRecipe, entry

NO_CLIP = ("q", "k", "qkv")


def activation_scale(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = E|x|^alpha per input channel, normalised so that max(s) * min(s) = 1."""
    a = x.abs().float().mean(dim=0).clamp(min=1e-8)
    s = a.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def scaled_error(weights: list[torch.Tensor], x: torch.Tensor, s: torch.Tensor, grid: Grid | list[Grid]) -> float:
    """Output error, summed over the projections reading `x`, of quantizing W diag(s) (each on its grid) and
    undoing s."""
    total = 0.0
    grids = grid if isinstance(grid, list) else [grid] * len(weights)
    for w, g in zip(weights, grids):
        w_hat = fake_quantize(w * s[None, :], g) / s[None, :]
        total += float(((x @ (w - w_hat).T) ** 2).sum())
    return total / x.shape[0]


def search_scale(weights: list[torch.Tensor], x: torch.Tensor, grid: Grid | list[Grid], n_grid: int = 20
                 ) -> tuple[float, torch.Tensor, list[tuple[float, float]]]:
    """(alpha*, s(alpha*), [(alpha, error)...]) over alpha = 0, 1/n_grid, ..., (n_grid-1)/n_grid."""
    tried = [(i / n_grid, scaled_error(weights, x, activation_scale(x, i / n_grid), grid)) for i in range(n_grid)]
    best = min(tried, key=lambda t: t[1])[0]
    return best, activation_scale(x, best), tried


def search_clip(w: torch.Tensor, x: torch.Tensor, grid: Grid, ratios: torch.Tensor, tokens: int = 256
                ) -> torch.Tensor:
    """Per (output row, group): the clip ratio of `ratios` whose rounding moves the group's outputs least."""
    out, cols = w.shape
    g = grid.group_size(cols)
    xs = x[:tokens].float().reshape(-1, cols // g, g)  # [n, groups, g]
    best_err = torch.full((out, cols // g), float("inf"))
    best = torch.ones(out, cols // g)
    for r in ratios.tolist():
        d = (w - fake_quantize(w, grid, r)).reshape(out, cols // g, g)
        err = torch.einsum("ogk,ngk->ong", d, xs).pow(2).sum(dim=1)  # [out, groups]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best


@dataclass
class AWQ(QuantMethod):
    name = "awq"
    paper = "Lin et al. 2024, AWQ (arXiv:2306.00978)"
    n_grid: int = 20
    alpha: float | None = None  # a fixed exponent instead of the search
    clip: bool = True
    max_shrink: float = 0.5  # the clip search tries ratios 1 .. 1 - max_shrink
    clip_grid: int = 20
    tokens: int = 1024  # calibration tokens the activations and errors are measured on

    def params(self) -> dict[str, Any]:
        return {**super().params(), "n_grid": self.n_grid, "alpha": self.alpha, "clip": self.clip,
                "max_shrink": self.max_shrink, "clip_grid": self.clip_grid, "tokens": self.tokens}

    def calibrate(self, calib: Any, target: float | None = None, grids: dict[str, Grid] | None = None) -> QuantRecipe:
        """`grids`: a grid per projection key (mixed precision); default every projection on this method's."""
        lm = calib.lm
        grids = grids or dict.fromkeys(self.targets(lm), self.grid())
        self.check_grid(lm, grids)
        ratios = 1.0 - torch.arange(self.clip_grid) / self.clip_grid * self.max_shrink
        weights: dict[str, dict[str, Any]] = {}
        alphas: dict[str, float] = {}
        for layer in track(lm.adapter.layers, total=lm.adapter.num_layers, description="awq", enabled=self.progress):
            groups = input_groups(layer)
            samples = calib.input_samples([projection_key(layer.index, g[0]) for g in groups], self.tokens)
            for roles in groups:
                x = samples[projection_key(layer.index, roles[0])]
                ws = [layer.linears[r].weight().detach().float() for r in roles]
                own = [grids[projection_key(layer.index, r)] for r in roles]
                if self.alpha is None:
                    alpha, s, _ = search_scale(ws, x, own, self.n_grid)
                else:
                    alpha, s = self.alpha, activation_scale(x, self.alpha)
                for role, w, grid in zip(roles, ws, own):
                    key = projection_key(layer.index, role)
                    alphas[key] = alpha
                    scaled = w * s[None, :]
                    clip = search_clip(scaled, x / s[None, :], grid, ratios) if self.clip and role not in NO_CLIP \
                        else 1.0
                    weights[key] = entry(quantize(scaled, grid, clip), input_scale=s)
        if HEAD in grids:
            view = self.targets(lm)[HEAD]
            weights[HEAD] = entry(quantize(view.weight().detach().float(), grids[HEAD]))
        return self.recipe(calib, weights, {"alpha": alphas, "tokens": self.tokens})
