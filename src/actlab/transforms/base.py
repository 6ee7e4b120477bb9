"""The transform protocol every family implements (sparsity, layers, interventions; KV and quantization next).

A `Method` calibrates from a calibration set to a budget and returns a `Recipe`. A recipe is typed and
versioned data that reproduces the transform exactly: it names its family and method, records the identity of
the model it was made for (and refuses another), saves and loads as JSON or YAML with its tensors in a
safetensors sidecar (`actlab.transforms.io`), and knows how to

- `attach(lm, stack)`: change the model for the duration of an ExitStack (write hooks, weight swaps), so that
  closing the stack restores the model bit for bit; it may return a meter of what it did (e.g. the sparsity
  achieved);
- `claims(lm)`: say what it touches, so that a composition can refuse recipes that cannot stack;
- `apply_cost(ledger, lm)`: change the cost ledger (weights read per token, KV cache, parameters);
- `export_hf(lm)`: say how it exports to a Hugging Face directory ("weights": folded into the saved model;
  "runtime": saved beside it and re-attached by `actlab.load_model`; or a ConfigError saying why not).

Recipes compose (`actlab.transforms.compose`): a list applied in order, validated, with costs that compose.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from actlab.errors import ConfigError
from actlab.models.identity import require_same_model

RECIPE_FORMAT = 2  # of the file: header + sidecar; 1 was the sparsity-only recipe with inline lists


@dataclass(frozen=True)
class Claim:
    """Something a recipe changes: `target` is a site name ("L3.q_in"), a projection's weights ("weights:L3.q")
    or a layer part ("layer:L3", "layer:L3.attn", "layer:L3.mlp"); `kind` how it changes it."""

    target: str
    kind: str  # "mask" | "add" | "scale" | "replace" | "weights" | "drop" | "quantize"
    owner: str = ""  # the recipe that claims it, for error messages


# Two claims on one target can stack unless one of them replaces it, or both mask it (two activation-sparsity
# rules on one projection input), or both rewrite the same weights (two quantizations of one matrix), or both
# quantize one input (two W8A8 recipes).
EXCLUSIVE = {"replace"}
NOT_TWICE = {"mask", "weights", "drop", "quantize"}


class Recipe(ABC):
    """Base of every family's recipe (subclasses are dataclasses with fields `method`, `model`, ...)."""

    family: ClassVar[str]
    version: ClassVar[int] = 1  # of the family's fields; bump and migrate in `from_dict` when they change

    method: str
    model: dict[str, Any]
    calibration: dict[str, Any]

    # -- identity ----------------------------------------------------------------------------------
    def check_model(self, lm: Any) -> None:
        require_same_model(self.model, lm.identity, f"this {self.family} recipe ({self.method}) was calibrated")

    # -- serialisation ------------------------------------------------------------------------------
    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """Every field as plain data (tensors allowed: the file writer moves them to the sidecar)."""

    @classmethod
    @abstractmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        """Validate and build; raise ConfigError naming the field that is wrong."""

    def header(self) -> dict[str, Any]:
        return {"family": self.family, "version": self.version, **self.to_dict()}

    def save(self, path) -> None:
        from actlab.transforms.io import save_recipe

        save_recipe(self, path)

    @classmethod
    def load(cls, path) -> Recipe:
        """Read a recipe file; on a family's class, refuse a file of another family."""
        from actlab.transforms.io import load_recipe

        recipe = load_recipe(path)
        if cls is not Recipe and not isinstance(recipe, cls):
            raise ConfigError(f"{path} holds a {recipe.family} recipe, not a {cls.family} one")
        return recipe

    def describe(self) -> str:
        return f"{self.family}:{self.method}"

    # -- behaviour ------------------------------------------------------------------------------------
    @abstractmethod
    def attach(self, lm: Any, stack: contextlib.ExitStack) -> Any:
        """Change `lm` until `stack` closes; return a meter (or None)."""

    def claims(self, lm: Any) -> list[Claim]:
        return []

    def apply_cost(self, ledger: Any, lm: Any) -> None:
        """Change the cost ledger (`actlab.transforms.cost.CostLedger`) as this transform changes the model."""

    def export_hf(self, lm: Any) -> str:
        """"weights" if `fold_into(model)` makes a plain HF model compute the transform, "runtime" if only
        actlab can run it (the recipe is saved beside the model); raise ConfigError where neither holds."""
        return "runtime"

    def changes_structure(self, lm: Any) -> bool:
        """Whether folding renumbers or reshapes the model's layers (recipes keyed by them no longer fit)."""
        return False

    def fold_into(self, lm: Any, model: Any) -> Any:
        """Apply the transform to `model` (a copy of lm.model, or its config) for export; returns the model."""
        raise ConfigError(f"{self.describe()} cannot be folded into weights")

    def engine_plan(self, lm: Any) -> Any:
        """What the decode engine must do to run this recipe (see actlab.engine); None: it cannot."""
        return None


class NoCalibration:
    """What a calibration-free method (RTN, the KV presses) is given in place of a calibration set: the model,
    nothing measured."""

    def __init__(self, lm: Any):
        self.lm = lm

    def describe(self) -> dict[str, Any]:
        return {"data": None}


class Method(ABC):
    """A training-free method of one family: calibrate from a calibration set to a budget."""

    family: ClassVar[str]
    name: ClassVar[str]
    paper: ClassVar[str]  # one line: the paper it re-derives, or "actlab" for our own

    @abstractmethod
    def calibrate(self, calib: Any, target: float) -> Recipe:
        """A recipe meeting `target` (the family's budget) from calibration data."""


def make_method(methods: dict[str, type[Method]], kind: str, name: str, **params: Any) -> Method:
    """The method `name` of a family's registry built with `params`; unknown names and bad parameters are
    one-line errors (`kind`: "sparsity", "layer", ... for the message)."""
    if name not in methods:
        raise ConfigError(f"unknown {kind} method {name!r}; methods: {', '.join(methods)}")
    try:
        return methods[name](**params)
    except TypeError as exc:
        raise ConfigError(f"bad parameters for {name}: {exc}") from exc


RECIPE_TYPES: dict[str, type[Recipe]] = {}


def register_recipe(cls: type[Recipe]) -> type[Recipe]:
    if cls.family in RECIPE_TYPES and RECIPE_TYPES[cls.family] is not cls:
        raise ValueError(f"two recipe types for family {cls.family!r}")
    RECIPE_TYPES[cls.family] = cls
    return cls


def recipe_type(family: Any) -> type[Recipe]:
    _load_families()
    if family not in RECIPE_TYPES:
        raise ConfigError(f"unknown recipe family {family!r}; families: {', '.join(sorted(RECIPE_TYPES))}")
    return RECIPE_TYPES[family]


def _load_families() -> None:
    """Import every family package so that their recipe types are registered."""
    import actlab.transforms.kv  # noqa: F401
    import actlab.transforms.layers  # noqa: F401
    import actlab.transforms.quant  # noqa: F401
    import actlab.transforms.sparsity  # noqa: F401
    import actlab.transforms.steer  # noqa: F401
