"""The sparsity budget: which projections count, with what weight, and how dropped fractions add up.

The *effective sparsity* is the parameter-weighted fraction of linear-layer weight columns skipped per token
(TEAL's definition),

    effective = sum_l params_l * dropped_l / sum_l params_l

over every projection of every layer (q, k, v, o, gate, up, down; GPT-2's fused qkv counts once), excluding
embeddings and the LM head. `dropped_l` is the fraction of input channels of projection l that are zero, per
token. For a rule computed on the activation output (`source="act"`, CATS/CHESS), the down projection skips
those input columns and the up projection skips the same output rows, so both count; the gate projection
stays dense (a CoreInfer core rule skips the gate's rows as well). A low-rank correction (R-Sparse) reads
r (in + out) weights, which count against the budget.
"""

from __future__ import annotations

import math
from typing import Any

from actlab.errors import ConfigError
from actlab.models.adapter import LinearView, ModelAdapter
from actlab.models.keys import ROLES, projection_key, split_key


def check_target(target: float) -> float:
    if not isinstance(target, (int, float)) or math.isnan(target) or not 0.0 <= target < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {target}")
    return float(target)


def projection_keys(adapter: ModelAdapter, roles: tuple[str, ...] = ROLES) -> list[str]:
    return [projection_key(layer.index, role) for layer in adapter.layers for role in layer.linears if role in roles]


def projection_view(adapter: ModelAdapter, key: str) -> LinearView:
    """The adapter's view (module, weight, shape) of the projection `key` names."""
    layer, role = split_key(key)
    return adapter.layers[layer].linears[role]


def projection_params(adapter: ModelAdapter) -> dict[str, int]:
    """Parameters of every projection, keyed "L{i}.{role}" (the weights of the budget)."""
    return {projection_key(layer.index, role): lin.num_params for layer in adapter.layers
            for role, lin in layer.linears.items()}


def projection_shapes(adapter: ModelAdapter) -> dict[str, tuple[int, int]]:
    return {projection_key(layer.index, role): (lin.out_features, lin.in_features)
            for layer in adapter.layers for role, lin in layer.linears.items()}


def effective_sparsity(dropped: dict[str, float], params: dict[str, int]) -> float:
    total = sum(params.values())
    return sum(params[k] * dropped.get(k, 0.0) for k in params) / total


def lowrank_cost(rank: int, shape: tuple[int, int]) -> float:
    """Weights read by a rank-r factorisation of an [out, in] matrix, as a fraction of the matrix."""
    out_features, in_features = shape
    return rank * (in_features + out_features) / (in_features * out_features)


def dropped_by_rules(rules: dict[str, Any], per_rule: dict[str, float],
                     shapes: dict[str, tuple[int, int]] | None = None) -> dict[str, float]:
    """Expand per-rule dropped fractions to projections: an act-rule on down also skips up's rows (a core
    rule also the gate's), and a low-rank correction reads back part of what was skipped (`shapes` needed)."""
    out = dict(per_rule)
    for key, rule in rules.items():
        layer, role = split_key(key)
        if rule.source == "act" and role == "down" and key in per_rule:  # a core rule before any prompt: none
            for skipped in ("up", "gate") if rule.kind == "core" else ("up",):
                out[projection_key(layer, skipped)] = per_rule[key]
        if rule.rank and key in out:
            out[key] -= lowrank_cost(rule.rank, shapes[key])
    return out
