"""Budget arithmetic shared by the methods: from per-projection score histograms to thresholds."""

from __future__ import annotations

import math

from actlab.errors import ConfigError
from actlab.transforms.sparsity.scores import ScoreHistogram


def subset_fraction(target: float, params: dict[str, int], subset: list[str], method: str) -> float:
    """The dropped fraction each projection of `subset` needs so that the effective sparsity is `target`.

    Methods that sparsify only some projections (CATS: up and down) cannot reach every budget."""
    reach = sum(params[k] for k in subset) / sum(params.values())
    if target > reach + 1e-9:
        raise ConfigError(f"{method} sparsifies only {reach:.1%} of the linear weights of this model, so it cannot "
                          f"reach an effective sparsity of {target:.1%}")
    return min(1.0, target / reach) if reach > 0 else 0.0


def global_threshold(hists: dict[str, ScoreHistogram], params: dict[str, int], target: float,
                     subset: list[str] | None = None) -> float:
    """One threshold t on comparable scores such that sum_l params_l * dropped_l(t) / sum params = target."""
    keys = subset if subset is not None else list(hists)
    total = sum(params.values())

    def effective(t: float) -> float:
        return sum(params[k] * hists[k].dropped_at(t) for k in keys) / total

    if target <= 0:
        return 0.0
    lo, hi = 1e-30, 1.0
    while effective(hi) < target:
        hi *= 4
        if hi > 1e30:
            raise ConfigError(f"target {target:.1%} cannot be reached with these projections")
    for _ in range(200):  # bisection on log scale
        mid = math.sqrt(lo * hi)
        if effective(mid) < target:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-9:
            break
    return hi


def thresholds_at(hists: dict[str, ScoreHistogram], fractions: dict[str, float]) -> dict[str, float]:
    return {k: hists[k].threshold_for(f) for k, f in fractions.items()}
