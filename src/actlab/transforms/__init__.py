"""Transforms: one protocol (`Method` -> `Recipe`), recipe files, composition, costs; one package per family."""

from actlab.transforms.base import Claim, Method, Recipe, recipe_type
from actlab.transforms.compose import Attached, ComposedRecipe, attach, compose, cost_of, validate
from actlab.transforms.io import load_recipe, save_recipe

__all__ = ["Attached", "Claim", "ComposedRecipe", "Method", "Recipe", "attach", "compose", "cost_of", "load_recipe",
           "recipe_type", "save_recipe", "validate"]
