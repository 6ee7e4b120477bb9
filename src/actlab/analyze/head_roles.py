"""Heads by role, from a profile's `heads` (streamed over the corpus) and `head_roles` (constructed probes)
tables: what a KV-cache policy needs to know of each head.

A head can hold several roles. Thresholds: a sink head puts more than half of its attention on the first token;
a streaming head keeps STREAMING_MASS of its attention within the first tokens and a recent window (a
StreamingLLM cache would serve it, DuoAttention's streaming heads); a retrieval head copies at least
RETRIEVAL_SCORE of needle tokens from far context (Wu et al. 2024 use 0.1); an induction head puts at least
INDUCTION_SCORE of its attention on the token after an earlier occurrence of the current one.
"""

from __future__ import annotations

import pandas as pd

SINK_MASS = 0.5
STREAMING_MASS = 0.9
RETRIEVAL_SCORE = 0.1
INDUCTION_SCORE = 0.3

# role -> (table, column, threshold, what it means)
ROLES = {
    "sink": ("heads", "first_token_mass", SINK_MASS, "attention mass on the first token"),
    "streaming": ("heads", "streaming_mass", STREAMING_MASS, "mass on the first tokens and a recent window"),
    "retrieval": ("head_roles", "retrieval_score", RETRIEVAL_SCORE, "needle tokens copied from far context"),
    "induction": ("head_roles", "induction_score", INDUCTION_SCORE, "attention to the token after an earlier "
                                                                    "occurrence"),
}


def role_scores(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per (layer, head) with each role's score the run holds."""
    frames = []
    for role, (table, column, _, _) in ROLES.items():
        t = tables.get(table)
        if t is not None and len(t) and column in t and t[column].notna().any():
            frames.append(t[["layer", "head", column]].rename(columns={column: role}).set_index(["layer", "head"]))
    if not frames:
        return pd.DataFrame(columns=["layer", "head"])
    return pd.concat(frames, axis=1).reset_index()


def heads_by_role(tables: dict[str, pd.DataFrame], first: int | None = None) -> list[dict]:
    """For each role the run measured: the heads past its threshold, strongest first, as L<layer>.H<head>
    (the `first` strongest, with a count of the rest)."""
    scores = role_scores(tables)
    out = []
    for role, (_, _, threshold, meaning) in ROLES.items():
        if role not in scores:
            continue
        chosen = scores[scores[role] >= threshold].sort_values(role, ascending=False)
        shown = chosen if first is None else chosen.head(first)
        listed = ", ".join(f"L{int(r.layer)}.H{int(r.head)} ({getattr(r, role):.2f})" for r in shown.itertuples())
        if len(shown) < len(chosen):
            listed += f", ... and {len(chosen) - len(shown)} more"
        out.append({"role": role, "meaning": meaning, "threshold": threshold, "count": len(chosen),
                    "of": len(scores), "heads": listed, "chosen": [(int(r.layer), int(r.head))
                                                                   for r in chosen.itertuples()]})
    return out
