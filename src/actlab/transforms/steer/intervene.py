"""The intervention API: change activations at named sites for the duration of a `with` block.

    from actlab import intervene, record
    from actlab.transforms.steer import add, zero, patch

    with intervene(lm, {"L12.resid_out": add(vector, 4.0), "L3.attn.head5": zero()}):
        lm.model.generate(...)           # or lm.model(ids), or a DecodeEngine built inside the block

Targets are site names (`actlab.probe.sites`), optionally narrowed: `L3.o_in.head5` (or `L3.attn.head5`, the
same: head 5's input to o), `L5.act[12,40]` (channels 12 and 40: neurons). An operation made here carries no
site; `intervene` binds it. Unknown targets are one-line errors that list the site kinds. On exit the model
is exactly as before (the write hooks of `actlab.probe.edit`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from actlab.errors import ConfigError
from actlab.probe.edit import Edit, Editor
from actlab.probe.sites import get_site
from actlab.transforms.steer.recipe import SiteEdit

TARGET = re.compile(r"^(?P<site>.+?)(?:\.head(?P<head>\d+))?(?:\[(?P<channels>[\d,\s]+)\])?$")
Positions = Sequence[int] | None


def add(vector: Any, coeff: float = 1.0, positions: Positions = None) -> SiteEdit:
    return SiteEdit("", "add", vector, coeff, positions=_list(positions))


def scale(factor: Any, positions: Positions = None) -> SiteEdit:
    return SiteEdit("", "scale", factor, positions=_list(positions))


def zero(positions: Positions = None) -> SiteEdit:
    return SiteEdit("", "zero", positions=_list(positions))


def replace(value: Any, positions: Positions = None) -> SiteEdit:
    return SiteEdit("", "replace", value, positions=_list(positions))


def mean(values: Any, positions: Positions = None) -> SiteEdit:
    """Mean ablation: `values` is the site's mean (see `site_means`), of the selected heads' or channels' width."""
    return SiteEdit("", "mean", values, positions=_list(positions))


def patch(source: torch.Tensor, positions: Positions = None) -> SiteEdit:
    """Take the activation from another run (`record(...)[site]`), at the same absolute positions."""
    return SiteEdit("", "patch", source, positions=_list(positions))


def bind(target: str, edit: SiteEdit, lm: Any) -> SiteEdit:
    """`edit` at `target` ("L3.attn.head5", "L5.act[12,40]", "L6.resid_out"), checked against the model."""
    site, heads, channels = parse_target(target)
    if heads is not None and edit.heads is not None or channels is not None and edit.channels is not None:
        raise ConfigError(f"{target}: the target and the operation both choose heads or channels")
    bound = dataclasses.replace(edit, site=site, heads=heads if heads is not None else edit.heads,
                                channels=channels if channels is not None else edit.channels)
    bound.edit(lm)  # unknown sites, wrong widths, heads a site lacks: errors before anything is attached
    return bound


def parse_target(target: str) -> tuple[str, list[int] | None, list[int] | None]:
    match = TARGET.match(target.strip()) if isinstance(target, str) else None
    if match is None:
        raise ConfigError(f"intervention target {target!r} is not a site name (e.g. L3.resid_out, L3.attn.head5, "
                          "L5.act[12,40])")
    site = match["site"]
    if site.endswith(".attn"):  # a head of the attention sublayer: its slice of o's input
        site = site[: -len(".attn")] + ".o_in"
    heads = [int(match["head"])] if match["head"] is not None else None
    channels = [int(c) for c in match["channels"].split(",") if c.strip()] if match["channels"] else None
    return site, heads, channels


def edits_of(lm: Any, interventions: Mapping[str, SiteEdit | Iterable[SiteEdit]]) -> list[SiteEdit]:
    if not isinstance(interventions, Mapping):
        raise ConfigError("interventions are a mapping {target: operation}, e.g. {'L6.resid_out': add(v, 4.0)}")
    out = []
    for target, ops in interventions.items():
        for op in [ops] if isinstance(ops, SiteEdit) else list(ops):
            if not isinstance(op, SiteEdit):
                raise ConfigError(f"{target}: {op!r} is not an intervention (use add, scale, zero, replace, mean, "
                                  "patch from actlab.transforms.steer)")
            out.append(bind(target, op, lm))
    return out


def intervene(lm: Any, interventions: Mapping[str, SiteEdit | Iterable[SiteEdit]]) -> Editor:
    """A context manager applying `interventions` ({target: operation or list of them}) to `lm`."""
    return Editor(lm, [e.edit(lm) for e in edits_of(lm, interventions)])


@torch.no_grad()
def record(lm: Any, input_ids: torch.Tensor, sites: Iterable[str]) -> dict[str, torch.Tensor]:
    """The flat view of each site, [batch, tokens, channels], from one forward of `input_ids` (what `patch`
    takes; heads are laid out head after head)."""
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    seen: dict[str, torch.Tensor] = {}
    names = list(dict.fromkeys(sites))
    for name in names:
        get_site(lm.adapter, name, writable=True)

    def keep(name):
        def op(x, _ctx):
            seen[name] = x.detach().clone()
            return x
        return op

    with Editor(lm, [Edit(name, keep(name)) for name in names]):
        lm.model(input_ids=ids.to(lm.device))
    return seen


@torch.no_grad()
def site_means(lm: Any, windows: torch.Tensor, sites: Iterable[str], batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Each site's mean flat view over every position of `windows` [n, tokens] (float64 sums): the values of mean
    ablation."""
    names = list(dict.fromkeys(sites))
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        views = record(lm, batch, names)
        for name, x in views.items():
            total = x.double().reshape(-1, x.shape[-1]).sum(0)
            sums[name] = sums[name] + total if name in sums else total
        count += batch.numel()
    return {name: (s / count).float() for name, s in sums.items()}


def _list(positions: Positions) -> list[int] | None:
    return None if positions is None else [int(p) for p in positions]
