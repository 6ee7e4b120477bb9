"""The intervention recipe: edits at sites (add a steering vector, scale, zero, replace), per head and position.

It is the probe's write hooks as data: each `SiteEdit` becomes one `Edit` when attached. Vectors live in the
recipe's safetensors sidecar. Interventions are a runtime transform: they export beside the dense model.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from actlab import schema
from actlab.errors import ConfigError
from actlab.probe import edit as ops
from actlab.probe.edit import Edit, Editor, check_selection
from actlab.probe.sites import get_site
from actlab.transforms.base import Claim, Recipe, register_recipe

CLAIM_OF = {"add": "add", "scale": "scale", "zero": "replace", "replace": "replace", "mean": "replace",
            "patch": "replace"}
OPS = tuple(CLAIM_OF)


@dataclass
class SiteEdit:
    """One intervention at a site: `op` is add (value x coeff), scale (by a number or a vector), zero, replace (by
    a vector), mean (replace by the site's mean, a vector: mean ablation) or patch (by the site's view recorded in
    another run, [batch or 1, tokens, channels]). `heads` or `channels` narrow it to some heads of an attention
    site or some channels (neurons); `positions` to some positions (absolute; negative count from the end of
    each forward call)."""

    site: str
    op: Literal["add", "scale", "zero", "replace", "mean", "patch"]
    value: Any = None  # add / replace / mean: a vector of the selected width; scale: a number or vector
    coeff: float = 1.0  # add: the vector's multiplier
    heads: list[int] | None = None
    positions: list[int] | None = None
    channels: list[int] | None = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ConfigError(f"{self.site}: unknown intervention {self.op!r}; one of {', '.join(OPS)}")
        if self.value is not None and not isinstance(self.value, (int, float)):
            self.value = torch.as_tensor(self.value, dtype=torch.float32)
            if not bool(torch.isfinite(self.value).all()):
                raise ConfigError(f"{self.site}: the {self.op} value has NaN or infinite entries")
        elif isinstance(self.value, float) and not math.isfinite(self.value):
            raise ConfigError(f"{self.site}: the {self.op} value must be finite, got {self.value}")
        if self.op in ("add", "replace", "mean", "patch", "scale") and self.value is None:
            raise ConfigError(f"{self.site}: {self.op} needs a value")
        if self.op == "patch" and (not torch.is_tensor(self.value) or self.value.dim() not in (2, 3)):
            raise ConfigError(f"{self.site}: patch needs the site's recorded view, [batch, tokens, channels]")
        if isinstance(self.coeff, bool) or not isinstance(self.coeff, (int, float)) or not math.isfinite(self.coeff):
            raise ConfigError(f"{self.site}: coeff must be a finite number, got {self.coeff!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "op": self.op, "value": self.value, "coeff": self.coeff, "heads": self.heads,
                "positions": self.positions, "channels": self.channels}

    def width(self, site: Any) -> int:
        """How many values the edit's vector has at `site`: the channels chosen, a head, or the whole view."""
        if self.channels is not None:
            return len(self.channels)
        return site.heads[1] if self.heads is not None and site.heads is not None else site.channels

    def edit(self, lm: Any) -> Edit:
        site = get_site(lm.adapter, self.site, writable=True)
        made = Edit(self.site, self._op(), heads=self.heads, positions=self.positions, channels=self.channels)
        check_selection(made, site)
        if self.op == "patch":
            if self.value.shape[-1] != site.channels:
                raise ConfigError(f"{self.site}: the patch source has {self.value.shape[-1]} channels, the site has "
                                  f"{site.channels}")
        elif torch.is_tensor(self.value) and self.value.dim() and self.value.shape[-1] != self.width(site):
            what = "chosen channels" if self.channels is not None else (
                "channels per head" if self.heads is not None else "channels")
            raise ConfigError(f"{self.site}: the {self.op} vector has {self.value.shape[-1]} values, the site has "
                              f"{self.width(site)} {what}")
        return made

    def _op(self) -> ops.Op:
        if self.op == "add":
            return ops.add(self.value, self.coeff)
        if self.op == "scale":
            return ops.scale(self.value)
        if self.op == "zero":
            return ops.zero()
        if self.op == "patch":
            return ops.patch(self.value)
        return ops.replace(self.value)  # replace, mean


@register_recipe
@dataclass
class InterventionRecipe(Recipe):
    method: str
    model: dict[str, Any]
    edits: list[SiteEdit]
    params: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    family = "steer"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "model": self.model, "edits": [e.to_dict() for e in self.edits],
                "params": self.params, "calibration": self.calibration}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InterventionRecipe:
        return schema.build(cls, d, "intervention recipe")

    def describe(self) -> str:
        return f"steer:{self.method}[{len(self.edits)} edit{'s' if len(self.edits) != 1 else ''}]"

    def attach(self, lm: Any, stack: contextlib.ExitStack) -> None:
        stack.enter_context(Editor(lm, [e.edit(lm) for e in self.edits]))

    def claims(self, lm: Any) -> list[Claim]:
        for e in self.edits:
            e.edit(lm)  # refuse unknown sites and wrong widths before anything is attached
        return [Claim(e.site, CLAIM_OF[e.op]) for e in self.edits]
