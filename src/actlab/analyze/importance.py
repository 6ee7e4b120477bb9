"""Which blocks and sublayers matter, from a profile's tables: every part with each importance metric, the parts
each metric would remove first, and how far the metrics agree.

The cheap metrics come from the profile (the `layers` table's cosines and the `angular_distance` table); the
measured one, the calibration-loss increase of removing each part alone, from an `importance` table that
`actlab layers --importance --run RUN` adds to a run. A cheap metric is useful where its ranking agrees with
the measured one (Spearman's rho near 1): that is what the report shows.
"""

from __future__ import annotations

import pandas as pd

NAN = float("nan")
MEASURED = "measured loss increase"

# kind -> (metric name, how it is read from a `layers` row): lower = more removable for every metric
CHEAP = {
    "block": {"Block Influence": lambda r: r.get("block_influence", NAN)},
    "attn": {"1 - cos(x, x + attn)": lambda r: 1 - r.get("cos_attn", NAN)},
    "mlp": {"1 - cos(x, x + mlp)": lambda r: 1 - r.get("cos_mlp", NAN)},
}
ANGULAR = "angular distance d(l, l+1)"
KIND_NAMES = {"block": "blocks", "attn": "attention sublayers", "mlp": "MLP sublayers"}


def part_metrics(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per part (L3, L3.attn, L3.mlp) with its kind, layer and one column per metric it has (NaN where a
    metric does not apply or the run lacks it)."""
    layers = tables.get("layers", pd.DataFrame())
    if not len(layers) or "block_influence" not in layers:
        return pd.DataFrame(columns=["part", "kind", "layer"])
    angular = tables.get("angular_distance", pd.DataFrame())
    next_depth = ({int(r.start): float(r.angular_distance) for r in angular.itertuples() if r.span == 1}
                  if len(angular) else {})
    rows = []
    for r in layers.to_dict("records"):
        layer = int(r["layer"])
        for kind, metrics in CHEAP.items():
            row = {"part": f"L{layer}" + ("" if kind == "block" else f".{kind}"), "kind": kind, "layer": layer}
            for name, read in metrics.items():
                row[name] = float(read(r))
            if kind == "block":
                row[ANGULAR] = next_depth.get(layer, NAN)
            rows.append(row)
    out = pd.DataFrame(rows)
    measured = tables.get("importance")
    if measured is not None and len(measured):
        out = out.merge(measured[["part", "delta_loss"]].rename(columns={"delta_loss": MEASURED}), on="part",
                        how="left")
    return out


def metric_columns(parts: pd.DataFrame, kind: str) -> list[str]:
    rows = parts[parts["kind"] == kind]
    names = [*CHEAP[kind], *([ANGULAR] if kind == "block" else []), MEASURED]
    return [n for n in names if n in rows and rows[n].notna().sum() >= 2]


def removal_order(parts: pd.DataFrame, kind: str, metric: str) -> list[str]:
    """The parts of one kind, most removable (lowest metric) first."""
    rows = parts[(parts["kind"] == kind) & parts[metric].notna()]
    return rows.sort_values([metric, "layer"])["part"].tolist()


def agreement(parts: pd.DataFrame) -> pd.DataFrame:
    """Spearman's rho between every pair of metrics of each kind (ties get their mean rank)."""
    rows = []
    for kind in CHEAP:
        names = metric_columns(parts, kind)
        of_kind = parts[parts["kind"] == kind]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                both = of_kind[[a, b]].dropna()
                rho = float(both[a].rank().corr(both[b].rank())) if len(both) >= 3 else NAN
                rows.append({"kind": kind, "metric": a, "against": b, "spearman": rho, "parts": len(both)})
    return pd.DataFrame(rows, columns=["kind", "metric", "against", "spearman", "parts"])


def rankings(parts: pd.DataFrame, first: int = 8) -> list[dict]:
    """For each kind and metric: the `first` parts it would remove first, and its rho with the measured metric."""
    rho = agreement(parts)
    out = []
    for kind in CHEAP:
        for metric in metric_columns(parts, kind):
            with_measured = rho[(rho["kind"] == kind) & (rho["metric"] == metric) & (rho["against"] == MEASURED)]
            out.append({"kind": KIND_NAMES[kind], "metric": metric,
                        "first": ", ".join(removal_order(parts, kind, metric)[:first]),
                        "spearman_with_measured": float(with_measured["spearman"].iloc[0]) if len(with_measured)
                        else NAN})
    return out
