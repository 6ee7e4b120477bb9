"""Composition: several recipes, of any families, applied in order as one transform; and `attach`.

A `ComposedRecipe` is a recipe whose members are applied in list order (each member sees the model as the
ones before it left it). It saves as one file. Before anything is attached the composition is validated:
every member must be for this model, nothing may touch a part of the model another member removed, and two
members may not claim one target in ways that cannot stack (see `Claim`). Costs compose member by member.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from actlab.errors import ConfigError
from actlab.models.keys import kind_of, layer_key, layer_of, sublayer_of
from actlab.transforms.base import EXCLUSIVE, NOT_TWICE, Claim, Recipe, recipe_type, register_recipe
from actlab.transforms.cost import Cost, recipe_cost


@register_recipe
@dataclass
class ComposedRecipe(Recipe):
    recipes: list[Recipe] = field(default_factory=list)
    family = "composed"

    def __post_init__(self) -> None:
        flat: list[Recipe] = []
        for r in self.recipes:
            flat.extend(r.recipes if isinstance(r, ComposedRecipe) else [r])
        if not flat:
            raise ConfigError("a composition needs at least one recipe")
        self.recipes = flat

    @property
    def method(self) -> str:  # type: ignore[override]
        return "+".join(r.describe() for r in self.recipes)

    @property
    def model(self) -> dict[str, Any]:  # type: ignore[override]
        return self.recipes[0].model

    @property
    def calibration(self) -> dict[str, Any]:  # type: ignore[override]
        return {}

    def describe(self) -> str:
        return " + ".join(r.describe() for r in self.recipes)

    def check_model(self, lm: Any) -> None:
        for r in self.recipes:
            r.check_model(lm)

    def to_dict(self) -> dict[str, Any]:
        return {"recipes": [r.header() for r in self.recipes]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ComposedRecipe:
        from actlab.transforms.io import recipe_from_header

        if set(d) != {"recipes"} or not isinstance(d["recipes"], list):
            raise ConfigError("a composition holds exactly one field, 'recipes': a list of recipes")
        members = []
        for i, member in enumerate(d["recipes"]):
            if not isinstance(member, dict):
                raise ConfigError(f"recipes[{i}]: expected a recipe, got {type(member).__name__}")
            try:
                members.append(recipe_from_header(member))
            except ConfigError as exc:
                raise ConfigError(f"recipes[{i}]: {exc}") from exc
        return cls(members)

    def header(self) -> dict[str, Any]:
        return {"family": self.family, "version": self.version, **self.to_dict()}

    def attach(self, lm: Any, stack: contextlib.ExitStack) -> list[Any]:
        return [r.attach(lm, stack) for r in self.recipes]

    def claims(self, lm: Any) -> list[Claim]:
        return [c for r in self.recipes for c in r.claims(lm)]

    def apply_cost(self, ledger: Any, lm: Any) -> None:
        for r in self.recipes:
            r.apply_cost(ledger, lm)


def compose(*recipes: Recipe | Sequence[Recipe]) -> Recipe:
    """One recipe from several (a single recipe is returned as it is)."""
    flat: list[Recipe] = []
    for r in recipes:
        if isinstance(r, (list, tuple)):
            flat.extend(r)
        else:
            flat.append(r)
    if len(flat) == 1:
        return flat[0]
    return ComposedRecipe(flat)


def members(recipe: Recipe) -> list[Recipe]:
    return list(recipe.recipes) if isinstance(recipe, ComposedRecipe) else [recipe]


def validate(recipe: Recipe, lm: Any) -> None:
    """Refuse a composition that cannot be applied to `lm` as one transform (one-line errors)."""
    recipe.check_model(lm)
    parts = members(recipe)
    claims = [Claim(c.target, c.kind, c.owner or f"#{i + 1} {r.describe()}")
              for i, r in enumerate(parts) for c in r.claims(lm)]
    removed = {c.target.removeprefix("layer:"): c.owner for c in claims if c.kind == "drop"}
    for c in claims:
        if c.kind == "drop":
            continue
        hit = _removed_part(c.target, removed)
        if hit is not None and removed[hit] != c.owner:
            raise ConfigError(f"{c.owner} changes {c.target}, but {removed[hit]} removes {hit}: a rule on a dropped "
                              "layer cannot apply")
    cache_users = [c.owner for c in claims if c.target == "kv-cache"]
    if cache_users:
        n = lm.adapter.num_layers
        if all(layer_key(i) in removed or f"{layer_key(i)}.attn" in removed for i in range(n)):
            raise ConfigError(f"{cache_users[0]} compresses the KV cache, but the composition removes every attention "
                              "sublayer: the model has no KV cache left")
    by_target: dict[str, list[Claim]] = {}
    for c in claims:
        by_target.setdefault(c.target, []).append(c)
    for target, group in by_target.items():
        owners = {c.owner for c in group}
        if len(owners) < 2:
            continue
        kinds = [c.kind for c in group]
        clash = [k for k in kinds if k in EXCLUSIVE] or [k for k in set(kinds) if k in NOT_TWICE and kinds.count(k) > 1]
        if clash:
            raise ConfigError(f"{' and '.join(sorted(owners))} both {clash[0]} {target}: these recipes cannot stack "
                              "(compose recipes that change different parts, or calibrate one on top of the other)")


def _removed_part(target: str, removed: dict[str, str]) -> str | None:
    """The removed layer part (a key of `removed`: "L3", "L3.attn", "L3.mlp") that contains `target`, if any."""
    name = target.removeprefix("weights:").removeprefix("layer:")
    layer = layer_of(name)
    if layer is None:
        return None
    block = layer_key(layer)
    if block in removed:
        return block
    part = sublayer_of(kind_of(name)) if "." in name else None
    return f"{block}.{part}" if part and f"{block}.{part}" in removed else None


@dataclass
class Attached:
    """What `attach` yields: the recipes in effect and what each one measured (None where nothing)."""

    recipe: Recipe
    meters: list[Any]

    def summary(self, lm: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for meter in self.meters:
            if meter is not None and hasattr(meter, "summary"):
                out.update(meter.summary(lm))
        return out


@contextlib.contextmanager
def attach(lm: Any, *recipes: Recipe | Sequence[Recipe]) -> Iterator[Attached]:
    """Apply `recipes` (in order) to `lm` for the duration of the block; the model is bit-identical after, also
    when the block raises. Saving the model from inside warns that what is saved is the untransformed model."""
    recipe = compose(*recipes)
    validate(recipe, lm)
    with contextlib.ExitStack() as stack:
        _warn_on_save(lm.model, recipe, stack)
        meters = [r.attach(lm, stack) for r in members(recipe)]
        yield Attached(recipe, meters)


def _warn_on_save(model: Any, recipe: Recipe, stack: contextlib.ExitStack) -> None:
    original = model.save_pretrained  # the bound method of the class (no instance attribute exists)

    def save_pretrained(*args, **kwargs):
        warnings.warn(f"save_pretrained inside actlab's attach saves the model without {recipe.describe()} (hooks "
                      "are not weights): use `actlab export --recipe` to save a transformed model", UserWarning,
                      stacklevel=2)
        return original(*args, **kwargs)

    model.save_pretrained = save_pretrained
    stack.callback(lambda: model.__dict__.pop("save_pretrained", None))


def cost_of(lm: Any, recipe: Recipe | None) -> Cost:
    return recipe_cost(lm, members(recipe) if recipe is not None else [])


__all__ = ["Attached", "ComposedRecipe", "attach", "compose", "cost_of", "members", "recipe_type", "validate"]
