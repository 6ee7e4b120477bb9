"""The patching job: exact activation patching and attribution patching over a pairs file, into a directory.

    DIR/results.json      per table the mean normalised effect over the pairs, exact and attributed, the
                          clean / corrupted metric of every pair, and the correlation of attribution with exact
    DIR/<table>.csv       the exact table (layers as rows)
    DIR/<table>.png       heatmaps: exact beside attributed
    DIR/report.html       the heatmaps and the strongest patches, one page

The directory is written atomically: it appears complete or not at all (an existing one needs --overwrite).
"""

from __future__ import annotations

import base64
import html
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from actlab.data.pairs import load_patch_pairs
from actlab.errors import ConfigError
from actlab.fsutil import atomic_directory, atomic_write_json
from actlab.jobs import setup
from actlab.progress import track

TABLE_LABELS = {"resid": ("residual stream entering the layer (resid_in)", "position"),
                "heads": ("attention head output (its input to o, every position)", "head"),
                "mlp": ("MLP output (down_out)", "position")}


def patch_job(model: str, *, pairs: str, out: str, metric: str = "logit-diff", tables: str = "resid,heads,mlp",
              exact: bool = True, overwrite: bool = False, progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    from actlab.transforms.steer import patching as P

    P.metric_fn(metric)
    chosen = tuple(t.strip() for t in tables.split(",") if t.strip())
    unknown = [t for t in chosen if t not in P.TABLES]
    if unknown or not chosen:
        raise ConfigError(f"--tables {tables!r}: choose from {', '.join(P.TABLES)}")
    target = Path(out)
    if target.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    raw = load_patch_pairs(pairs)
    lm = setup.model(model, log)
    encoded = P.encode_pairs(lm, raw)
    attributed = [P.attribution_patching(lm, p, metric, chosen) for p in encoded]
    result: dict[str, Any] = {"model": lm.name, "pairs": pairs, "n_pairs": len(encoded), "metric": metric,
                              "tokens": int(encoded[0].clean.shape[1]), "tables": list(chosen),
                              "per_pair": [{"clean": a["clean"], "corrupt": a["corrupt"]} for a in attributed],
                              "attribution": {t: v.tolist() for t, v in P.average(attributed, chosen).items()}}
    if exact:
        patched = [P.exact_patching(lm, p, metric, chosen)
                   for p in track(encoded, description="patching, pair by pair", enabled=progress)]
        means = P.average(patched, chosen)
        result["exact"] = {t: v.tolist() for t, v in means.items()}
        result["correlation"] = {t: _pearson(means[t], P.average(attributed, chosen)[t]) for t in chosen}
    if target.exists():
        shutil.rmtree(target)
    with atomic_directory(target) as tmp:
        atomic_write_json(tmp / "results.json", result)
        figures = {}
        for t in chosen:
            if exact:
                (tmp / f"{t}.csv").write_text(_csv(result["exact"][t], TABLE_LABELS[t][1]))
            figures[t] = _heatmap(t, result)
            (tmp / f"{t}.png").write_bytes(figures[t])
        (tmp / "report.html").write_text(_page(result, figures))
    return {**{k: v for k, v in result.items() if k not in ("exact", "attribution", "per_pair")},
            "top": _top(result), "out": str(target)}


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator else float("nan")


def _top(result: dict[str, Any], k: int = 5) -> dict[str, list[dict[str, Any]]]:
    source = result.get("exact") or result["attribution"]
    out = {}
    for t, grid in source.items():
        flat = [(v, i, j) for i, row in enumerate(grid) for j, v in enumerate(row)]
        flat.sort(key=lambda x: -abs(x[0]))
        out[t] = [{"layer": i, TABLE_LABELS[t][1]: j, "effect": v} for v, i, j in flat[:k]]
    return out


def _csv(grid: list[list[float]], axis: str) -> str:
    head = "layer," + ",".join(f"{axis}{j}" for j in range(len(grid[0])))
    return "\n".join([head, *(f"{i}," + ",".join(f"{v:.6g}" for v in row) for i, row in enumerate(grid))]) + "\n"


def _heatmap(table: str, result: dict[str, Any]) -> bytes:
    import matplotlib.pyplot as plt

    from actlab.report.plots import _png

    panels = [("exact", result["exact"][table])] if "exact" in result else []
    panels.append(("attribution", result["attribution"][table]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    bound = max(1e-6, max(abs(v) for _, grid in panels for row in grid for v in row))
    for ax, (name, grid) in zip(axes[0], panels):
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-bound, vmax=bound)
        ax.set_title(f"{name}: {TABLE_LABELS[table][0]}", fontsize=8)
        ax.set_xlabel(TABLE_LABELS[table][1])
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _png(fig)


def _page(result: dict[str, Any], figures: dict[str, bytes]) -> str:
    parts = [f"<h1>Activation patching: {html.escape(result['model'])}</h1>",
             f"<p>{result['n_pairs']} pairs from {html.escape(result['pairs'])}, {result['tokens']} tokens each; "
             f"metric {result['metric']}, effects normalised: 1 = the clean run's value restored, 0 = the "
             "corrupted run's.</p>"]
    for t, png in figures.items():
        corr = result.get("correlation", {}).get(t)
        note = f" (attribution vs exact: Pearson r = {corr:.3f})" if corr is not None else ""
        parts.append(f"<h2>{html.escape(TABLE_LABELS[t][0])}{note}</h2>"
                     f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    return "<!doctype html><meta charset='utf-8'><title>actlab patching</title>" + "\n".join(parts) + "\n"
