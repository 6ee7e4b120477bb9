"""The comparison page of an evaluation: every model variant side by side, per task and metric, with errors.

    <out>/results.json            the whole evaluation (model identity, columns, metrics, differences, costs)
    <out>/items/<column>/<task>.jsonl   per-item records (log-likelihoods, predictions, targets)
    <out>/table.md                the lm-eval-style table
    <out>/compare.html            a self-contained page: the table, a plot per metric, costs and measurements
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from actlab.data.tasks import LOWER_IS_BETTER
from actlab.fsutil import atomic_write_json, atomic_write_text


def write_comparison(evaluation: Any, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", evaluation.to_dict())
    for col in evaluation.columns:
        for task, result in col.results.items():
            lines = "".join(json.dumps(r) + "\n" for r in result.records)
            atomic_write_text(out / "items" / col.name / f"{task}.jsonl", lines)
    table = evaluation.table()
    atomic_write_text(out / "table.md", table + "\n")
    atomic_write_text(out / "compare.html", render_page(evaluation, table))
    return out / "compare.html"


def render_page(evaluation: Any, table: str) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("actlab.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html"]))
    png = base64.b64encode(plot(evaluation)).decode()
    columns = [{"name": c.name, "recipe": "dense model" if c.recipe is None else c.recipe.describe(),
                "measured": c.measured, "cost": c.cost, "speed": c.speed} for c in evaluation.columns]
    return env.get_template("compare.html").render(model=evaluation.model, limit=evaluation.limit, table=table,
                                                   png=png, columns=columns)


def plot(evaluation: Any) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from actlab.report.plots import _png

    panels = [(t, m) for t, r in evaluation.columns[0].results.items() for m in r.metrics]
    cols = evaluation.columns
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels) + 1, 3.4), squeeze=False)
    colors = plt.cm.tab10.colors
    for ax, (task, metric) in zip(axes[0], panels):
        values = [c.results[task].metrics[metric] for c in cols]
        ax.bar(range(len(cols)), [v for v, _ in values], yerr=[s for _, s in values], capsize=3,
               color=[colors[i % 10] for i in range(len(cols))])
        ax.set_xticks(range(len(cols)), [c.name for c in cols], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{task}\n{metric} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better)",
                     fontsize=9)
        if metric in LOWER_IS_BETTER:
            ax.set_yscale("log")
        else:
            lo = min(v - s for v, s in values if v == v)
            ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max(v + s for v, s in values if v == v) + 0.05))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{evaluation.model.get('name')}: every variant on the same items (bars: ±1 standard error)",
                 fontsize=10)
    fig.tight_layout()
    return _png(fig)
