"""Training-free activation sparsity: one file per method behind one protocol (`Sparsifier`)."""

from __future__ import annotations

from actlab.errors import ConfigError
from actlab.transforms.sparsity.base import MaskRule, Sparsifier, SparsityRecipe, check_target
from actlab.transforms.sparsity.calibration import CalibrationData
from actlab.transforms.sparsity.cats import Cats
from actlab.transforms.sparsity.chess import Chess
from actlab.transforms.sparsity.coreinfer import CoreInfer
from actlab.transforms.sparsity.loss_aware import LossAware
from actlab.transforms.sparsity.magnitude import Magnitude
from actlab.transforms.sparsity.masking import SparsityMeter, attach
from actlab.transforms.sparsity.rsparse import RSparse
from actlab.transforms.sparsity.stat_topk import StatTopK
from actlab.transforms.sparsity.teal import Teal
from actlab.transforms.sparsity.wina import Wina

METHODS: dict[str, type[Sparsifier]] = {cls.name: cls for cls in (Teal, Cats, Chess, Wina, StatTopK, Magnitude, RSparse, CoreInfer,
                                                                 LossAware)}


def get_method(name: str, **params) -> Sparsifier:
    if name not in METHODS:
        raise ConfigError(f"unknown sparsity method {name!r}; methods: {', '.join(METHODS)}")
    try:
        return METHODS[name](**params)
    except TypeError as exc:
        raise ConfigError(f"bad parameters for {name}: {exc}") from exc


REFINE_STEPS = 1


def calibrate(method: str | Sparsifier, calib: CalibrationData, target: float, refine: int = REFINE_STEPS,
              **params) -> SparsityRecipe:
    """Calibrate `method` to `target` effective sparsity.

    Thresholds fitted on the dense model drop more than planned once upstream layers are sparse (their
    inputs shrink); each refinement step re-fits the method on histograms recorded under the current
    recipe, so the budget is met by the sparse model itself. `refine=0` is the methods' original
    dense-only calibration."""
    sparsifier = get_method(method, **params) if isinstance(method, str) else method
    target = check_target(target)
    recipe = sparsifier.calibrate(calib, target)
    for step in range(refine if target > 0 else 0):
        if all(rule.kind in ("topk", "core") for rule in recipe.rules.values()):
            break  # exact per-token (or per-sentence) top-k: nothing to refit
        previous, recipe = recipe, sparsifier.calibrate(calib.sparse_view(recipe), target)
        recipe.calibration = {**previous.calibration, **recipe.calibration}  # e.g. the losses that chose a variant
        recipe.calibration["refined"] = step + 1
    return recipe


__all__ = ["METHODS", "CalibrationData", "MaskRule", "Sparsifier", "SparsityMeter", "SparsityRecipe", "attach",
           "calibrate", "check_target", "get_method"]
