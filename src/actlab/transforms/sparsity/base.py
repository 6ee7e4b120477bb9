"""The protocol every activation-sparsity method implements (the sparsity family's `Method`).

A method turns calibration statistics (a `SparsityCalibration`, see scores.py) into a `SparsityRecipe`: one
`MaskRule` per projection it sparsifies (recipe.py; rule semantics in rules.py; budget in budget.py).
Attaching, measuring and saving are shared (attach.py, the recipe's `save`).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

from actlab.transforms.base import Method
from actlab.transforms.sparsity.recipe import SparsityRecipe


class Sparsifier(Method):
    """A training-free activation-sparsity method: calibrate to a budget, produce a recipe.

    Subclasses set `name` and `paper` and implement `calibrate`."""

    family = "sparsity"
    name: ClassVar[str]
    paper: ClassVar[str]
    needs_prompt: ClassVar[bool] = False  # its masks are chosen at a prompt (perplexity needs "last-half")

    @abstractmethod
    def calibrate(self, calib: Any, target: float) -> SparsityRecipe:
        """Turn calibration statistics (`SparsityCalibration`) into a recipe meeting `target`."""
