"""KV-cache compression: one file per press behind `KVPress` (base.py)."""

from __future__ import annotations

from actlab.transforms.base import make_method
from actlab.transforms.kv.base import CacheView, KVPress, check_ratio, kept_count, kept_indices
from actlab.transforms.kv.h2o import H2O
from actlab.transforms.kv.knorm import KNorm
from actlab.transforms.kv.snapkv import SnapKV
from actlab.transforms.kv.streaming_llm import StreamingLLM
from actlab.transforms.kv.tova import TOVA

PRESSES: dict[str, type[KVPress]] = {cls.name: cls for cls in (StreamingLLM, KNorm, SnapKV, TOVA, H2O)}


def get_press(name: str, **params) -> KVPress:
    return make_method(PRESSES, "kv", name, **params)  # type: ignore[arg-type,return-value]


__all__ = ["PRESSES", "CacheView", "KVPress", "check_ratio", "get_press", "kept_count", "kept_indices"]
