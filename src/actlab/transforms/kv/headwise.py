"""The head-wise policy (RazorAttention, Tang et al. 2024; DuoAttention, Xiao et al. 2024): heads that retrieve
from far context keep their whole cache, the others keep the attention sinks and a recent window (StreamingLLM).
Which heads retrieve comes from a profile (`actlab profile`'s head_roles and heads tables): a KV head's score is
the highest retrieval or induction score of the query heads it serves; heads that stream (mass on the first
tokens and a recent window, the heads table) come first among equals. The least retrieving heads are compressed
at `streaming_ratio` until the ratios average to the target; one head takes the remainder."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from actlab.errors import ConfigError
from actlab.transforms.kv.method import OPTIONS, KVMethod


def head_scores(tables: dict[str, pd.DataFrame], layers: int, heads: int, kv: int) -> torch.Tensor:
    """[layers, kv heads]: how much each KV head's query heads retrieve (retrieval or induction, the highest),
    less a hundredth of how much they stream (so that among non-retrieving heads the streaming ones go first)."""
    roles, streams = tables.get("head_roles"), tables.get("heads")
    if roles is None or not len(roles) or "retrieval_score" not in roles:
        raise ConfigError("the head-wise policy needs the profile's head_roles table (profile the model with its "
                          "attention heads: actlab profile, all sites)")
    score = torch.zeros(layers, heads, dtype=torch.float64)
    for r in roles.itertuples():
        value = max(float(getattr(r, "retrieval_score", 0.0) or 0.0), float(getattr(r, "induction_score", 0.0) or 0.0))
        if int(r.layer) < layers and int(r.head) < heads:
            score[int(r.layer), int(r.head)] = value
    if streams is not None and "streaming_mass" in streams:
        for r in streams.itertuples():
            if int(r.layer) < layers and int(r.head) < heads and r.streaming_mass == r.streaming_mass:
                score[int(r.layer), int(r.head)] -= 0.01 * float(r.streaming_mass)
    return score.view(layers, kv, heads // kv).amax(-1)


def allocate(scores: torch.Tensor, target: float, streaming_ratio: float) -> torch.Tensor:
    """Per-head ratios averaging `target`: the lowest-scored heads at `streaming_ratio`, one at the remainder, the
    rest 0 (ties: the earlier layer and head first)."""
    n = scores.numel()
    ratio = max(streaming_ratio, target)
    order = sorted(range(n), key=lambda i: (float(scores.view(-1)[i]), i))
    out = torch.zeros(n, dtype=torch.float64)
    total = target * n  # the ratio mass to place
    for i in order:
        if total <= 1e-12:
            break
        out[i] = min(ratio, total)
        total -= out[i]
    return out.view_as(scores)


class HeadWise(KVMethod):
    name = "headwise"
    paper = "Tang et al. 2024 (arXiv:2407.15891); Xiao et al. 2024 (arXiv:2410.10819)"
    press = "streaming-llm"
    budgets = "per head: retrieval heads whole, the others sinks + recent (a profile)"
    needs_profile = True

    def __init__(self, sinks: int = 4, streaming_ratio: float = 0.9, **options: Any):
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise TypeError(f"unexpected parameter {sorted(unknown)[0]!r}")
        super().__init__(press_params={"sinks": sinks}, **options)
        if isinstance(streaming_ratio, bool) or not isinstance(streaming_ratio, (int, float)) \
                or not 0 < streaming_ratio < 1:
            raise ConfigError(f"headwise: streaming_ratio is what a streaming head removes, in (0, 1); "
                              f"got {streaming_ratio!r}")
        self.streaming_ratio = float(streaming_ratio)
        self.profile: dict[str, pd.DataFrame] | None = None  # the run's tables, set by the caller (actlab kv --run)
        self.profile_path: str | None = None

    def params(self) -> dict[str, Any]:
        return {"streaming_ratio": self.streaming_ratio}

    def calibrate(self, calib: Any, target: float):
        if self.profile is None:
            raise ConfigError("the head-wise policy needs a profile of the model: give --run RUN (a complete "
                              "`actlab profile` run with its head roles)")
        ad = calib.lm.adapter
        scores = head_scores(self.profile, ad.num_layers, ad.num_heads, ad.num_kv_heads)
        ratios = allocate(scores, target, self.streaming_ratio)
        full = [f"L{i}.KV{h}" for i, h in (scores >= 0.1).nonzero().tolist()]
        return self.recipe(calib.lm, target, ratios, {"data": None, "profile": self.profile_path,
                                                      "retrieval_kv_heads": full})
