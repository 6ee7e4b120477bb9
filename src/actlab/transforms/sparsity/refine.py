"""Calibrating a sparsity method to a budget, with refinement on the sparsified model itself."""

from __future__ import annotations

import time
from typing import Any

from actlab.errors import ConfigError
from actlab.progress import status
from actlab.transforms.sparsity.base import Sparsifier
from actlab.transforms.sparsity.budget import check_target
from actlab.transforms.sparsity.recipe import SparsityRecipe
from actlab.transforms.sparsity.scores import SparsityCalibration

REFINE_STEPS = 1


def calibrate(method: str | Sparsifier, calib: Any, target: float, refine: int = REFINE_STEPS,
              **params) -> SparsityRecipe:
    """Calibrate `method` to `target` effective sparsity.

    Thresholds fitted on the dense model drop more than planned once upstream layers are sparse (their
    inputs shrink); each refinement step re-fits the method on histograms recorded under the current
    recipe, so the budget is met by the sparse model itself. `refine=0` is the methods' original
    dense-only calibration."""
    from actlab.transforms.sparsity import get_method

    sparsifier = get_method(method, **params) if isinstance(method, str) else method
    target = check_target(target)
    if not isinstance(refine, int) or refine < 0:
        raise ConfigError(f"refine must be a whole number >= 0, got {refine!r}")
    calib = calib if isinstance(calib, SparsityCalibration) else SparsityCalibration.of(calib)
    start = time.perf_counter()
    status(f"{sparsifier.name}: calibrating to {target:.0%} effective sparsity ...")  # loss-aware: minutes
    recipe = sparsifier.calibrate(calib, target)
    for step in range(refine if target > 0 else 0):
        if all(rule.kind in ("topk", "core") for rule in recipe.rules.values()):
            break  # exact per-token (or per-sentence) top-k: nothing to refit
        status(f"{sparsifier.name}: refinement {step + 1}/{refine} on the sparsified model "
               f"({time.perf_counter() - start:.0f} s so far) ...")
        previous, recipe = recipe, sparsifier.calibrate(calib.sparse_view(recipe), target)
        recipe.calibration = {**previous.calibration, **recipe.calibration}  # e.g. the losses that chose a variant
        recipe.calibration["refined"] = step + 1
    return recipe
