"""How much each block and sublayer matters: cheap statistics of the residual stream and the measured cost.

- Block Influence, BI_l = 1 - E[cos(x_l, x_{l+1})] (ShortGPT, Men et al. 2024), and the sublayer cosines
  cos(x, x + attn), cos(x + attn, x + attn + mlp) (LLM-Drop, He et al. 2024: "What Matters in Transformers?");
- the angular distance between depths, d(l, l+n) = E[arccos cos(x_l, x_{l+n})] / pi (Gromov et al. 2024);
- the measured increase of the mean next-token loss on the calibration windows when a part is removed (with
  the parts already removed staying removed), the quantity SLEB and our greedy method minimise.

The budget of the layer family is the fraction of non-embedding parameters removed: the parameters of the
projections of the removed blocks and sublayers over those of every block (the LM head and embeddings are not
removable). It equals the fraction of the blocks' weight bytes a decoded token no longer reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from actlab.errors import ConfigError
from actlab.eval.perplexity import window_nll
from actlab.models.keys import layer_key
from actlab.progress import track

SUBLAYERS = ("attn", "mlp")


def check_budget(target: Any) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target < 1:
        raise ConfigError(f"--budget is the fraction of non-embedding parameters to remove, in [0, 1); got {target!r}")
    return float(target)


# -- parameters -----------------------------------------------------------------------------------------
def part_params(adapter: Any, part: str) -> int:
    """Parameters of the projections a part ("L3", "L3.attn", "L3.mlp") holds."""
    from actlab.transforms.layers.recipe import ATTENTION_ROLES

    index, _, sub = part.partition(".")
    layer = adapter.layers[int(index[1:])]
    return sum(lin.num_params for role, lin in layer.linears.items()
               if not sub or (role in ATTENTION_ROLES) == (sub == "attn"))


def block_params(adapter: Any) -> int:
    return sum(part_params(adapter, layer_key(i)) for i in range(adapter.num_layers))


def removed_fraction(adapter: Any, parts: Iterable[str]) -> float:
    return sum(part_params(adapter, p) for p in parts) / block_params(adapter)


def take_until(order: Sequence[str], adapter: Any, target: float, what: str) -> list[str]:
    """The shortest prefix of `order` (most removable first) that removes at least `target` of the parameters."""
    chosen: list[str] = []
    for part in order:
        if target <= 0 or removed_fraction(adapter, chosen) >= target:
            break
        chosen.append(part)
    if len(covered_layers(chosen)) == adapter.num_layers:
        raise ConfigError(f"{what} to {target:.1%} of the parameters would remove every layer")
    reached = removed_fraction(adapter, chosen)
    if reached < target:
        raise ConfigError(f"{what} can remove at most {reached:.1%} of the non-embedding parameters "
                          f"(asked {target:.1%})")
    return chosen


def covered_layers(parts: Iterable[str]) -> set[int]:
    """Layers gone entirely: removed as a block, or both of their sublayers removed."""
    parts = set(parts)
    layers = {int(p.split(".")[0][1:]) for p in parts}
    return {i for i in layers if layer_key(i) in parts or all(f"{layer_key(i)}.{s}" in parts for s in SUBLAYERS)}


# -- statistics of the residual stream --------------------------------------------------------------------
@dataclass
class DepthStatistics:
    block_influence: torch.Tensor  # [L]: 1 - E cos(x_l, x_{l+1})
    attn_influence: torch.Tensor  # [L]: 1 - E cos(x, x + attn) (NaN under a parallel residual)
    mlp_influence: torch.Tensor  # [L]: 1 - E cos(x + attn, x + attn + mlp)
    angular: torch.Tensor  # [L+1, L+1]: mean angular distance between block inputs (depth L: the output)


def depth_statistics(calib: Any, progress: bool = False) -> DepthStatistics:
    """One pass over the calibration windows (cached with the calibration set's statistics)."""
    def compute() -> dict[str, torch.Tensor]:
        from actlab.probe import Profiler
        from actlab.probe.stats.depth import AngularDistance
        from actlab.probe.stats.layers import LayerRedundancy

        def make():
            return Profiler(calib.lm, sites="L*.resid_in,L*.resid_mid,L*.resid_out",
                            statistics=[LayerRedundancy(), AngularDistance()])

        with calib.attached(calib.applied()):
            prof = calib.profiled(make)
        redundancy, angular = prof.statistic("layers"), prof.statistic("angular")
        table = redundancy.tables(None)["layers"].sort_values("layer")
        column = lambda name: torch.tensor(1.0 - table[name].to_numpy(dtype=float))  # noqa: E731
        return {"block_influence": column("cos_block"), "attn_influence": column("cos_attn"),
                "mlp_influence": column("cos_mlp"), "angular": angular.matrix().clone()}

    return DepthStatistics(**calib._cached("depth", None, compute))


# -- measured loss ------------------------------------------------------------------------------------------
def calibration_loss(calib: Any, removed: Sequence[str] = (), windows: torch.Tensor | None = None,
                     repair: dict[str, Any] | None = None) -> float:
    """Mean next-token NLL on the calibration windows with `removed` parts taken out (those in `repair`
    replaced by their repair), on top of the recipes the calibration set is seen under."""
    from actlab.transforms.layers.recipe import LayerRecipe

    lm = calib.lm
    every = calib.windows if windows is None else windows
    use = calib.local(every)  # this rank's block; the sums meet below
    recipes = list(calib.applied())
    if removed:
        kept = {p: r for p, r in (repair or {}).items() if p in removed}
        recipes.append(LayerRecipe("measure", lm.identity.to_dict(), list(removed), repair=kept))
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad(), calib.attached(recipes):
        for w in use:
            total += window_nll(lm.model, w[None].to(lm.device)).cpu().sum()
    calib.reduce(total)
    return float(total) / (every.shape[0] * (every.shape[1] - 1))


def candidate_parts(adapter: Any, kinds: Sequence[str], removed: Sequence[str] = ()) -> list[str]:
    """Every block ("block") and/or sublayer ("attn", "mlp") not yet removed, nor inside a removed block."""
    gone = set(removed)
    out = []
    for i in range(adapter.num_layers):
        block = layer_key(i)
        if block in gone:
            continue
        if "block" in kinds and not any(p.startswith(block + ".") for p in gone):
            out.append(block)
        out += [f"{block}.{s}" for s in SUBLAYERS if s in kinds and f"{block}.{s}" not in gone]
    return out


def removal_losses(calib: Any, candidates: Sequence[str], removed: Sequence[str] = (),
                   windows: torch.Tensor | None = None, repair: dict[str, Any] | None = None,
                   progress: bool = False, description: str = "removal losses") -> dict[str, float]:
    """The calibration loss with each candidate removed in addition to `removed` (with the repairs in
    `repair`, which may hold one for each candidate)."""
    return {part: calibration_loss(calib, [*removed, part], windows, repair)
            for part in track(candidates, total=len(candidates), description=description, enabled=progress)}


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho (ties get their mean rank)."""
    import pandas as pd

    return float(pd.Series(list(a)).rank().corr(pd.Series(list(b)).rank()))


def importance_table(calib: Any, progress: bool = False) -> tuple[Any, dict[str, float]]:
    """Every block and sublayer with each importance metric: the cheap statistics and the measured loss increase
    of removing it alone; and Spearman's rank correlation of each cheap metric with the measured one (how well
    it predicts which parts are safe to remove)."""
    import pandas as pd

    adapter = calib.lm.adapter
    stats = depth_statistics(calib, progress=progress)
    base = calibration_loss(calib)
    parts = candidate_parts(adapter, ["block", "attn", "mlp"])
    losses = removal_losses(calib, parts, progress=progress, description="measuring every part")
    rows = []
    for part in parts:
        i, _, sub = part.partition(".")
        layer = int(i[1:])
        cheap = {"": float(stats.block_influence[layer]), "attn": float(stats.attn_influence[layer]),
                 "mlp": float(stats.mlp_influence[layer])}[sub]
        rows.append({"part": part, "layer": layer, "kind": sub or "block", "params": part_params(adapter, part),
                     "influence": cheap, "angular_distance": float(stats.angular[layer, layer + 1]) if not sub
                     else float("nan"), "delta_loss": losses[part] - base})
    table = pd.DataFrame(rows)
    agreement = {}
    for kind, rows_of in table.groupby("kind"):
        agreement[f"{kind}: influence"] = rank_correlation(rows_of["influence"], rows_of["delta_loss"])
        if kind == "block":
            agreement["block: angular distance"] = rank_correlation(rows_of["angular_distance"], rows_of["delta_loss"])
    return table, agreement
