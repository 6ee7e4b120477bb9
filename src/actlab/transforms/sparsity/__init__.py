"""Training-free activation sparsity: one file per method behind one protocol (`Sparsifier`)."""

from __future__ import annotations

from actlab.transforms.base import make_method
from actlab.transforms.sparsity.attach import SparsityMeter, attach
from actlab.transforms.sparsity.base import Sparsifier
from actlab.transforms.sparsity.budget import check_target
from actlab.transforms.sparsity.cats import Cats
from actlab.transforms.sparsity.chess import Chess
from actlab.transforms.sparsity.coreinfer import CoreInfer
from actlab.transforms.sparsity.loss_aware import LossAware
from actlab.transforms.sparsity.magnitude import Magnitude
from actlab.transforms.sparsity.recipe import MaskRule, SparsityRecipe
from actlab.transforms.sparsity.refine import REFINE_STEPS, calibrate
from actlab.transforms.sparsity.rsparse import RSparse
from actlab.transforms.sparsity.scores import SparsityCalibration
from actlab.transforms.sparsity.stat_topk import StatTopK
from actlab.transforms.sparsity.teal import Teal
from actlab.transforms.sparsity.wina import Wina

METHODS: dict[str, type[Sparsifier]] = {cls.name: cls for cls in (Teal, Cats, Chess, Wina, StatTopK, Magnitude, RSparse,
                                                                 CoreInfer, LossAware)}
# methods whose rules the decode engine cannot run (low-rank paths, prompt-chosen cores): hooks only
HOOKS_ONLY = {"rsparse", "coreinfer"}
CalibrationData = SparsityCalibration  # the name round 1's API used


def get_method(name: str, **params) -> Sparsifier:
    return make_method(METHODS, "sparsity", name, **params)  # type: ignore[return-value]


__all__ = ["HOOKS_ONLY", "METHODS", "REFINE_STEPS", "CalibrationData", "MaskRule", "SparsityCalibration", "Sparsifier",
           "SparsityMeter", "SparsityRecipe", "attach", "calibrate", "check_target", "get_method"]
