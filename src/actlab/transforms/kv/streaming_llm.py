"""StreamingLLM (Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks"): keep the first
`sinks` tokens, which attention parks its mass on, and the most recent ones."""

from __future__ import annotations

import torch

from actlab.errors import ConfigError
from actlab.transforms.kv.base import CacheView, KVPress


class StreamingLLM(KVPress):
    name = "streaming-llm"
    paper = "Xiao et al. 2024 (arXiv:2309.17453)"

    def __init__(self, sinks: int = 4):
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ConfigError(f"streaming-llm: sinks must be a whole number >= 0, got {sinks!r}")
        self.sinks = sinks

    def params(self):
        return {"sinks": self.sinks}

    def score(self, view: CacheView, keep: int) -> torch.Tensor:
        b, kv, t = view.keys.shape[:3]
        positions = view.token_positions()
        score = positions.float().clone()  # later = kept first
        score[positions < self.sinks] = float("inf")  # ties keep the earliest, so fewer than `sinks` keep the first
        return score.expand(b, kv, t)
