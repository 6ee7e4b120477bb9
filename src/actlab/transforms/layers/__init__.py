"""Layer removal: whole blocks and attention / MLP sublayers (the recipe; methods arrive with their issue)."""

from actlab.transforms.layers.recipe import LayerRecipe, remove_blocks

__all__ = ["LayerRecipe", "remove_blocks"]
