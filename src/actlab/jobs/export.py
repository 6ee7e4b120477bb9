"""The export and compose jobs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from actlab.errors import ConfigError
from actlab.jobs import setup
from actlab.transforms import Recipe, compose, load_recipe, validate

FORMATS = ("hf", "gguf")


def export_job(model: str, recipe_path: str | None, out: str, fmt: str = "hf", dtype: str = "f32",
               log: Callable[[str], None] = print) -> dict[str, Any]:
    from actlab.export import export_gguf, export_hf

    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not out:
        raise ConfigError("give --out: a new directory (hf) or a .gguf file (gguf)")
    if fmt == "hf" and dtype != "f32":
        raise ConfigError("--dtype is for --format gguf (an HF export keeps the model's own dtype)")
    recipe = load_recipe(recipe_path) if recipe_path else None
    lm = setup.model(model, log)
    report = export_hf(lm, recipe, out) if fmt == "hf" else export_gguf(lm, recipe, out, dtype=dtype)
    return {"model": lm.name, "recipe": recipe.describe() if recipe else None, **report}


def compose_job(paths: list[str], out: str, model: str | None = None,
                log: Callable[[str], None] = print) -> Recipe:
    if len(paths) < 2:
        raise ConfigError("compose needs at least two recipe files")
    recipes = [load_recipe(p) for p in paths]
    composed = compose(recipes)
    weights = {r.model.get("weights_sha256") or r.model.get("fingerprint") for r in recipes}
    if len(weights) > 1:
        raise ConfigError("these recipes were calibrated for different models; a composition applies to one model")
    if model is not None:
        validate(composed, setup.model(model, log))
    composed.save(out)
    return composed
