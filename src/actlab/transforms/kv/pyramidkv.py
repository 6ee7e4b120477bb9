"""PyramidKV (Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling"): lower layers spread their attention, upper ones focus it, so the budget falls linearly with depth
(budgets.pyramid) while SnapKV's observation-window scores choose the tokens within each layer's budget."""

from __future__ import annotations

from typing import Any

from actlab.transforms.kv.budgets import pyramid
from actlab.transforms.kv.method import OPTIONS, KVMethod


class PyramidKV(KVMethod):
    name = "pyramidkv"
    paper = "Cai et al. 2024 (arXiv:2406.02069)"
    press = "snapkv"
    budgets = "per layer, falling linearly with depth"

    def __init__(self, beta: float = 20.0, window: int = 64, kernel: int = 5, **options: Any):
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise TypeError(f"unexpected parameter {sorted(unknown)[0]!r}")
        super().__init__(press_params={"window": window, "kernel": kernel}, **options)
        pyramid(2, 1, 0.5, beta)  # a bad beta: one line
        self.beta = beta

    def params(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def calibrate(self, calib: Any, target: float):
        ad = calib.lm.adapter
        return self.recipe(calib.lm, target, pyramid(ad.num_layers, ad.num_kv_heads, target, self.beta))
