"""Ablation: zero, mean or resample a part of the model and measure the loss change.

A part is an intervention target (`L3.attn.head5`, `L5.act[12,40]`, `L6.resid_out[100]`) or a whole sublayer
(`L3.attn`, `L3.mlp`: its output, o_out / down_out). Kinds:
- zero: the part's activation is 0;
- mean: its mean over every position of the windows measured (Wang et al.'s mean ablation);
- resample: its activation from another window at the same position (resample / causal-scrubbing ablation;
  window k takes window k+1's).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from actlab.errors import ConfigError
from actlab.probe.edit import Editor
from actlab.transforms.steer.intervene import bind, intervene, parse_target, record, site_means
from actlab.transforms.steer.recipe import SiteEdit

KINDS = ("zero", "mean", "resample")
SUBLAYER_OUTPUT = {"attn": "o_out", "mlp": "down_out"}


def part_target(part: str) -> str:
    """`L3.attn` / `L3.mlp` -> their output site; anything else is an intervention target as it is."""
    head, _, tail = part.strip().rpartition(".")
    if head and tail in SUBLAYER_OUTPUT and head.startswith("L") and head[1:].isdigit():
        return f"{head}.{SUBLAYER_OUTPUT[tail]}"
    return part.strip()


def _select(view: torch.Tensor, edit: SiteEdit, site: Any) -> torch.Tensor:
    """The part of a flat site view [..., channels] that `edit` selects, [..., width]."""
    if edit.heads is not None:  # one head (a target names one)
        n, hd = site.heads
        return view.reshape(*view.shape[:-1], n, hd)[..., edit.heads[0], :]
    if edit.channels is not None:
        return view[..., edit.channels]
    return view


@torch.no_grad()
def window_nll(lm: Any, windows: torch.Tensor, batch_size: int = 4) -> list[float]:
    """Mean next-token NLL of each window."""
    out = []
    for start in range(0, len(windows), batch_size):
        ids = windows[start:start + batch_size].to(lm.device)
        logits = lm.model(input_ids=ids).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        out += nll.mean(1).tolist()
    return out


def ablation_edits(lm: Any, part: str, kind: str, windows: torch.Tensor,
                   positions: list[int] | None = None) -> list[SiteEdit]:
    """The edits that ablate `part` by `kind` (mean: measured on `windows`), at `positions` (None: all)."""
    from actlab.probe.sites import get_site

    if kind not in KINDS:
        raise ConfigError(f"unknown ablation {kind!r}; one of {', '.join(KINDS)}")
    target = part_target(part)
    site_name = parse_target(target)[0]
    if kind == "zero":
        return [bind(target, SiteEdit("", "zero", positions=positions), lm)]
    site = get_site(lm.adapter, site_name, writable=True)
    if kind == "mean":
        probe = bind(target, SiteEdit("", "zero", positions=positions), lm)
        means = _select(site_means(lm, windows, [site_name])[site_name], probe, site)
        return [dataclasses.replace(probe, op="mean", value=means)]
    return []  # resample: per window, see loss_change


def loss_change(lm: Any, windows: torch.Tensor, parts: list[str], kind: str,
                dense: list[float] | None = None, positions: list[int] | None = None) -> dict[str, Any]:
    """Mean NLL over `windows` without and with every part in `parts` ablated together (at `positions`, or
    every position); the difference with the standard error of the paired per-window differences."""
    if len(windows) < 2 and kind == "resample":
        raise ConfigError("resample ablation takes the activation from another window: give at least two windows")
    dense = dense if dense is not None else window_nll(lm, windows)
    if kind == "resample":
        ablated = []
        for k in range(len(windows)):
            donor = windows[(k + 1) % len(windows)][None]
            edits = {}
            for part in parts:
                target = part_target(part)
                site_name = parse_target(target)[0]
                edits[target] = SiteEdit("", "patch", record(lm, donor, [site_name])[site_name], positions=positions)
            with intervene(lm, edits):
                ablated += window_nll(lm, windows[k:k + 1])
    else:
        edits = [e for part in parts for e in ablation_edits(lm, part, kind, windows, positions)]
        with Editor(lm, [e.edit(lm) for e in edits]):
            ablated = window_nll(lm, windows)
    diffs = [a - d for a, d in zip(ablated, dense)]
    mean = sum(diffs) / len(diffs)
    se = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1) / len(diffs)) if len(diffs) > 1 else 0.0
    base, after = sum(dense) / len(dense), sum(ablated) / len(ablated)
    return {"parts": parts, "kind": kind, "loss_dense": base, "loss": after, "delta": mean, "stderr": se,
            "ppl_dense": math.exp(base), "ppl": math.exp(after)}
