"""Interventions: steering vectors, ablations and replacements at sites, as recipes."""

from actlab.transforms.steer.recipe import InterventionRecipe, SiteEdit

__all__ = ["InterventionRecipe", "SiteEdit"]
