"""The protocol every KV method implements (the KV family's `Method`): from the model (and, for methods that
measure, calibration data) to a `KVRecipe` that removes `target` of the cached tokens on average.

A method decides the budgets - the ratio of each layer and KV head - and names the press that scores tokens
within them. Options every method shares: the phase (compress after the prompt, or after every forward),
question-aware compression, and KIVI quantization of what is kept (`bits`, `group`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from actlab.transforms.base import Method
from actlab.transforms.kv.base import check_ratio
from actlab.transforms.kv.recipe import KVRecipe

OPTIONS = ("phase", "question_aware", "bits", "group")


class KVMethod(Method):
    family = "kv"
    name: ClassVar[str]
    paper: ClassVar[str]
    press: ClassVar[str]  # the press that scores tokens within the budgets
    budgets: ClassVar[str] = "uniform"  # how ratios differ by layer and head (for --list-methods)
    calibrated: ClassVar[bool] = False  # measures something on calibration data
    needs_profile: ClassVar[bool] = False  # reads a profile run's tables (set as `profile` before calibrating)
    progress: bool = False

    def __init__(self, phase: str = "prefill", question_aware: bool = False, bits: int = 0, group: int = 32,
                 press_params: dict[str, Any] | None = None):
        self.options = {"phase": phase, "question_aware": question_aware, "bits": bits, "group": group}
        self.press_params = dict(press_params or {})
        KVRecipe(self.name, {}, press=self.press, press_params=self.press_params, **self.options)  # one-line errors

    def params(self) -> dict[str, Any]:
        return {}

    def make_press(self):
        from actlab.transforms.kv import get_press

        return get_press(self.press, **self.press_params)

    def recipe(self, lm: Any, target: float, head_ratios: torch.Tensor | None = None,
               calibration: dict[str, Any] | None = None) -> KVRecipe:
        return KVRecipe(self.name, lm.identity.to_dict(), ratio=check_ratio(target), press=self.press,
                        press_params=self.press_params, head_ratios=head_ratios, params=self.params(),
                        calibration=calibration or {"data": None}, **self.options)


class PressMethod(KVMethod):
    """A press with the same ratio for every layer and head (kvpress's `ScorerPress` with a compression ratio)."""

    def __init__(self, **params: Any):
        options = {k: params.pop(k) for k in OPTIONS if k in params}
        super().__init__(press_params=params, **options)

    def calibrate(self, calib: Any, target: float) -> KVRecipe:
        return self.recipe(calib.lm, target)


def press_method(press: type) -> type[PressMethod]:
    """The uniform method of a press: named, described and parameterised by the press."""
    return type(f"{press.__name__}Method", (PressMethod,), {"name": press.name, "press": press.name,
                                                           "paper": press.paper, "__doc__": press.__doc__})
