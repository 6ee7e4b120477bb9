"""KV-cache compression: one file per press behind `KVPress` (base.py), one per method behind `KVMethod`
(method.py), the recipe in recipe.py, budgets in budgets.py, the masked-reference lifecycle in session.py."""

from __future__ import annotations

from actlab.transforms.base import make_method
from actlab.transforms.kv.base import CacheView, KVPress, check_ratio, keep_mask, kept_count, kept_indices
from actlab.transforms.kv.h2o import H2O
from actlab.transforms.kv.headwise import HeadWise
from actlab.transforms.kv.kivi import KIVI
from actlab.transforms.kv.knorm import KNorm
from actlab.transforms.kv.loss_aware import LossAware
from actlab.transforms.kv.method import KVMethod, PressMethod, press_method
from actlab.transforms.kv.pyramidkv import PyramidKV
from actlab.transforms.kv.recipe import KVRecipe
from actlab.transforms.kv.snapkv import SnapKV
from actlab.transforms.kv.streaming_llm import StreamingLLM
from actlab.transforms.kv.tova import TOVA

PRESSES: dict[str, type[KVPress]] = {cls.name: cls for cls in (StreamingLLM, KNorm, SnapKV, TOVA, H2O)}


def get_press(name: str, **params) -> KVPress:
    return make_method(PRESSES, "kv", name, **params)  # type: ignore[arg-type,return-value]


METHODS: dict[str, type[KVMethod]] = {m.name: m for m in [*(press_method(p) for p in PRESSES.values()), PyramidKV,
                                                           HeadWise, LossAware, KIVI]}


def get_method(name: str, **params) -> KVMethod:
    return make_method(METHODS, "kv", name, **params)  # type: ignore[return-value]


__all__ = ["METHODS", "PRESSES", "CacheView", "KVMethod", "KVPress", "KVRecipe", "PressMethod", "check_ratio",
           "get_method", "get_press", "keep_mask", "kept_count", "kept_indices"]
