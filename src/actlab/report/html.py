"""Render a profile's tables as one self-contained HTML file (figures inlined as PNG; no network)."""

from __future__ import annotations

import base64
import json
from typing import Any

import jinja2
import pandas as pd

from actlab.analyze.findings import findings, layer_summary, next_steps
from actlab.analyze.head_roles import heads_by_role
from actlab.analyze.importance import MEASURED, agreement, part_metrics, rankings
from actlab.report.plots import FIGURES, missing

MASSIVE_ROWS = 20
SINK_ROWS = 10
ROLE_HEADS = 24  # heads listed per role in the report


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("actlab.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html"]))
    env.filters["token"] = show_token
    env.filters["num"] = lambda v, fmt: "–" if _absent(v) else fmt % v
    env.filters["pct"] = lambda v: "–" if _absent(v) else f"{v:.0%}"
    return env


def _absent(value: Any) -> bool:
    """Not collected: a column the run lacks (undefined in the template), None or NaN."""
    return isinstance(value, jinja2.Undefined) or value is None or value != value


def show_token(token: Any) -> str:
    """A token as a quoted string with its whitespace visible ("\n", " the"), to be HTML-escaped by the template
    (Jinja's tojson would print <bos> as \u003cbos\u003e)."""
    return json.dumps(str(token), ensure_ascii=False)


def massive_events(top: pd.DataFrame) -> list[dict[str, Any]]:
    """The largest activations, one row per event - a channel at one token, wherever that token stands - with the
    range of layers it spans, its peak, and how many (window, position) places it was seen at: the BOS of every
    window is one row, not one per window and layer."""
    if not len(top):
        return []
    top = top.assign(place=top["window"].astype(str) + ":" + top["position"].astype(str))
    events = top.groupby(["channel", "token"], as_index=False).agg(
        value=("value", "max"), first=("layer", "min"), last=("layer", "max"), layers=("layer", "nunique"),
        places=("place", "nunique"), positions=("position", lambda p: sorted(set(int(x) for x in p))))
    events["positions"] = events["positions"].map(
        lambda p: ", ".join(map(str, p[:4])) + (f" (+{len(p) - 4} more)" if len(p) > 4 else ""))
    return events.sort_values("value", ascending=False).head(MASSIVE_ROWS).to_dict("records")


def corpora(manifest: dict[str, Any]) -> str:
    """The corpus a run read, or for a merged run every corpus merged, with its tokens."""
    sources = manifest.get("sources")
    if not sources:
        return manifest.get("data", {}).get("name", "?")
    return " + ".join(f"{s.get('data', {}).get('name', '?')} ({s.get('tokens', '?')} tokens)" for s in sources)


def render_report(manifest: dict[str, Any], tables: dict[str, pd.DataFrame]) -> str:
    architecture = manifest.get("model", {}).get("architecture")
    if architecture:  # what figures need of the model itself (the logit lens's uniform-loss line: vocab_size)
        tables = {**tables, "model": pd.DataFrame([architecture])}
    figures = []
    for key, (title, draw, needs) in FIGURES.items():
        lacking = missing(tables, needs)
        png = None if lacking else base64.b64encode(draw(tables)).decode()
        figures.append({"key": key, "title": title, "png": png, "needs": ", ".join(lacking)})
    top = tables.get("top_activations", pd.DataFrame())
    massive_rows = massive_events(top)
    sinks = tables.get("sink_tokens", pd.DataFrame())
    protocol = manifest.get("protocol", {})
    parts = part_metrics(tables)
    return _environment().get_template("report.html").render(
        model=manifest["model"]["name"],
        data=corpora(manifest),
        tokens=manifest.get("tokens_done", "?"),
        windows=manifest.get("windows_done", "?"),
        seq_len=protocol.get("seq_len", "?"),
        bos={"every": "BOS first in every window", "tokenizer": "as tokenized (BOS only where the tokenizer puts it)",
             "none": "no BOS"}.get(protocol.get("bos", "tokenizer"), "?"),
        num_sites=len(manifest.get("sites", [])),
        status=manifest.get("status", "?"),
        versions=manifest.get("versions", {}),
        findings=findings(tables),
        next_steps=next_steps(tables, manifest["model"]["name"]),
        summary=layer_summary(tables).to_dict("records"),
        moe="experts" in tables and len(tables["experts"]) > 0,
        figures=figures,
        massive_rows=massive_rows,
        sink_rows=sinks.head(SINK_ROWS).to_dict("records") if len(sinks) else [],
        role_rows=heads_by_role(tables, first=ROLE_HEADS),
        importance_rows=rankings(parts) if len(parts) else [],
        importance_agreement=agreement(parts).to_dict("records") if len(parts) else [],
        importance_measured=MEASURED in parts,
        importance_command=f"actlab layers --model {manifest['model']['name']} --importance --run RUN",
        neuron_token_rows=tables.get("neuron_tokens", pd.DataFrame()).to_dict("records"),
        manifest_json=json.dumps({k: v for k, v in manifest.items() if k not in ("sites", "statistics")}, indent=2,
                                 default=str),
    )
