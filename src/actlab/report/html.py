"""Render a profile's tables as one self-contained HTML file (figures inlined as PNG; no network)."""

from __future__ import annotations

import base64
import json
from typing import Any

import jinja2
import pandas as pd

from actlab.analyze.findings import findings
from actlab.report.plots import FIGURES, missing

MASSIVE_ROWS = 20
SINK_ROWS = 10


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("actlab.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html"]))
    env.filters["token"] = show_token
    return env


def show_token(token: Any) -> str:
    """A token as a quoted string with its whitespace visible ("\n", " the"), to be HTML-escaped by the template
    (Jinja's tojson would print <bos> as \u003cbos\u003e)."""
    return json.dumps(str(token), ensure_ascii=False)


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
    massive_rows = top.sort_values("value", ascending=False).head(MASSIVE_ROWS).to_dict("records") if len(top) else []
    sinks = tables.get("sink_tokens", pd.DataFrame())
    protocol = manifest.get("protocol", {})
    return _environment().get_template("report.html").render(
        model=manifest["model"]["name"],
        data=manifest.get("data", {}).get("name", "?"),
        tokens=manifest.get("tokens_done", "?"),
        windows=manifest.get("windows_done", "?"),
        seq_len=protocol.get("seq_len", "?"),
        bos={"every": "BOS first in every window", "tokenizer": "as tokenized (BOS only where the tokenizer puts it)",
             "none": "no BOS"}.get(protocol.get("bos", "tokenizer"), "?"),
        num_sites=len(manifest.get("sites", [])),
        status=manifest.get("status", "?"),
        versions=manifest.get("versions", {}),
        findings=findings(tables),
        figures=figures,
        massive_rows=massive_rows,
        sink_rows=sinks.head(SINK_ROWS).to_dict("records") if len(sinks) else [],
        manifest_json=json.dumps({k: v for k, v in manifest.items() if k not in ("sites", "statistics")}, indent=2,
                                 default=str),
    )
