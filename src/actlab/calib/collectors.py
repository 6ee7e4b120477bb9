"""The math of the generic calibration statistics, apart from the hooks that feed them.

Each accumulator takes tensors one batch at a time and merges by plain sums, so a statistic over many
windows (or many processes) is the sum of its parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GradientEnergy:
    """Per input channel of one projection: sqrt(E[g_i^2]) of the gradient g reaching the input through it.

    `robust=True`: a typical token's gradient instead of the mean square, which a few tokens can own (on
    Gemma-3 the attention-sink token carries over 90% of the gradient energy of many projections): each
    token's squared gradient is normalised to unit sum, averaged over tokens, and rescaled by the median over
    tokens of the squared gradient norm."""

    robust: bool = False
    sums: torch.Tensor | None = None
    norms: list[torch.Tensor] = field(default_factory=list)

    def add(self, grad_x: torch.Tensor) -> None:
        """grad_x: [tokens, channels]."""
        sq = grad_x.double().pow(2)
        if self.robust:
            energy = sq.sum(-1, keepdim=True)
            self.norms.append(energy.flatten().float())
            sq = sq / energy.clamp_min(1e-300)
        self.sums = sq.sum(0) if self.sums is None else self.sums + sq.sum(0)

    def rms(self, tokens: int) -> torch.Tensor:
        if self.robust:
            return (self.sums / tokens * torch.cat(self.norms).median().double()).sqrt().float()
        return (self.sums / tokens).sqrt().float()
