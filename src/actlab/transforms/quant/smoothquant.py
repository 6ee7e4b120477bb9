"""SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models"): W8A8, with the activation outliers migrated into the weights first.

Derivation. Per-token int8 activations fail on the few input channels with outliers 100x the rest; per-channel
int8 weights are easy. Dividing input channel j by s_j and multiplying weight column j by s_j keeps W x, and
with  s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)  (alpha = 0.5: both sides equally hard) the per-token
range of x / s and the per-channel range of W diag(s) are balanced. Projections reading one input share s
(so that it can be folded into the operation before them, as the paper does with the norms).

The recipe holds 8-bit per-output-channel symmetric codes of W diag(s) and quantizes each projection's input
per token (dynamic, symmetric): y = Q(x / s) Q(W diag(s))^T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from actlab.errors import ConfigError
from actlab.models.keys import projection_key
from actlab.progress import track
from actlab.transforms.quant.base import QuantMethod, input_groups
from actlab.transforms.quant.grid import quantize
from actlab.transforms.quant.recipe import QuantRecipe, entry


def smoothing_scale(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|x_j|^alpha / max_p max|W_p[:, j]|^(1 - alpha) (channels that never fire keep s = 1)."""
    w_absmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0).clamp(min=1e-5)
    s = x_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.pow(1 - alpha)
    return torch.where(x_absmax > 0, s, torch.ones_like(s))


@dataclass
class SmoothQuant(QuantMethod):
    name = "smoothquant"
    paper = "Xiao et al. 2023, SmoothQuant (arXiv:2211.10438)"
    bits: int = 8
    group: int = 0
    symmetric: bool = True
    alpha: float = 0.5
    act_bits: int = 8
    tokens: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"smoothquant: alpha must be in [0, 1], got {self.alpha}")

    def params(self) -> dict[str, Any]:
        return {**super().params(), "alpha": self.alpha, "act_bits": self.act_bits, "tokens": self.tokens}

    def calibrate(self, calib: Any, target: float | None = None) -> QuantRecipe:
        lm = calib.lm
        self.check_grid(lm)
        grid = self.grid()
        weights: dict[str, dict[str, Any]] = {}
        for layer in track(lm.adapter.layers, total=lm.adapter.num_layers, description="smoothquant",
                           enabled=self.progress):
            groups = input_groups(layer)
            samples = calib.input_samples([projection_key(layer.index, g[0]) for g in groups], self.tokens)
            for roles in groups:
                x_absmax = samples[projection_key(layer.index, roles[0])].abs().amax(dim=0)
                ws = [layer.linears[r].weight().detach().float() for r in roles]
                s = smoothing_scale(x_absmax, ws, self.alpha)
                for role, w in zip(roles, ws):
                    weights[projection_key(layer.index, role)] = entry(quantize(w * s[None, :], grid), input_scale=s,
                                                                       act_bits=self.act_bits)
        return self.recipe(calib, weights, {"tokens": self.tokens})
