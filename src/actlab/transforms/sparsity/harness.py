"""The one evaluation of a sparsified model: perplexity with the recipe attached, achieved sparsity measured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from actlab.eval.perplexity import perplexity
from actlab.models.loader import LoadedModel
from actlab.transforms.sparsity.attach import SparsityMeter, attach
from actlab.transforms.sparsity.recipe import SparsityRecipe


@dataclass
class SparseEvaluation:
    sparse_ppl: float
    achieved_sparsity: float
    dropped: dict[str, float]
    tokens: int
    seconds: float
    window_nll: list[float] | None = None  # the mean NLL of each window

    def to_dict(self) -> dict[str, Any]:
        return {"sparse_ppl": self.sparse_ppl, "achieved_sparsity": self.achieved_sparsity, "tokens": self.tokens,
                "seconds": self.seconds}


def evaluate(lm: LoadedModel, recipe: SparsityRecipe, windows: torch.Tensor, progress: bool = True) -> SparseEvaluation:
    meter = SparsityMeter()
    with attach(lm, recipe, meter):
        result = perplexity(lm, windows, batch_size=1, progress=progress)
    return SparseEvaluation(sparse_ppl=result.ppl, achieved_sparsity=meter.effective(lm, recipe),
                            dropped=meter.dropped(), tokens=result.tokens, seconds=result.seconds,
                            window_nll=result.window_nll)
