"""Interventions: steering vectors, ablations, replacements and patches at sites, as an API and as recipes."""

from actlab.transforms.steer.intervene import (
                                               add,
                                               intervene,
                                               mean,
                                               parse_target,
                                               patch,
                                               record,
                                               replace,
                                               scale,
                                               site_means,
                                               zero,
)
from actlab.transforms.steer.recipe import InterventionRecipe, SiteEdit

__all__ = ["InterventionRecipe", "SiteEdit", "add", "intervene", "mean", "parse_target", "patch", "record", "replace",
           "scale", "site_means", "zero"]
