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
from actlab.probe.edit import Edit, Editor
from actlab.probe.sites import get_site
from actlab.transforms.base import Claim, Recipe, register_recipe

CLAIM_OF = {"add": "add", "scale": "scale", "zero": "replace", "replace": "replace"}


@dataclass
class SiteEdit:
    site: str
    op: Literal["add", "scale", "zero", "replace"]
    value: Any = None  # add / replace: a vector of the site's width (or of head_dim with `heads`); scale: a number
    coeff: float = 1.0  # add: the vector's multiplier
    heads: list[int] | None = None
    positions: list[int] | None = None  # absolute positions; negative count from the end of each call

    def __post_init__(self) -> None:
        if self.value is not None and not isinstance(self.value, (int, float)):
            self.value = torch.as_tensor(self.value, dtype=torch.float32)
            if not bool(torch.isfinite(self.value).all()):
                raise ConfigError(f"{self.site}: the {self.op} vector has NaN or infinite values")
        if self.op in ("add", "replace") and self.value is None:
            raise ConfigError(f"{self.site}: {self.op} needs a value")
        if not math.isfinite(self.coeff):
            raise ConfigError(f"{self.site}: coeff must be finite, got {self.coeff}")

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "op": self.op, "value": self.value, "coeff": self.coeff, "heads": self.heads,
                "positions": self.positions}

    def edit(self, lm: Any) -> Edit:
        site = get_site(lm.adapter, self.site, writable=True)
        width = site.heads[1] if self.heads is not None and site.heads is not None else site.channels
        if torch.is_tensor(self.value) and self.value.dim() and self.value.shape[-1] != width:
            raise ConfigError(f"{self.site}: the vector has {self.value.shape[-1]} values, the site has {width} "
                              f"channels{' per head' if self.heads is not None else ''}")
        op = {"add": lambda: ops.add(self.value, self.coeff), "scale": lambda: ops.scale(self.value),
              "zero": ops.zero, "replace": lambda: ops.replace(self.value)}[self.op]()
        return Edit(self.site, op, heads=self.heads, positions=self.positions)


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
