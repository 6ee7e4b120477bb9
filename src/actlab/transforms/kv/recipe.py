"""The KV recipe: which cached tokens each layer and KV head keeps (a press's scores and per-head ratios), when
the cache is compressed (once after the prompt, or after every forward as it grows), and optionally how it is
quantized (KIVI: keys per channel, values per token).

Attached to an HF model it runs as the masked reference (session.py): the cache keeps every token and the
attention ignores the evicted ones, so every head may keep its own count. The decode engine holds the same
kept tokens in a ragged cache that really shrinks (`actlab.engine`). Saved beside an exported model and
re-attached at load (runtime).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from actlab import schema
from actlab.errors import ConfigError
from actlab.models.keys import layer_key
from actlab.transforms.base import Claim, Recipe, register_recipe
from actlab.transforms.kv.base import check_ratio

CACHE = "kv-cache"  # the target a KV recipe claims
BITS = (0, 2, 4, 8)  # 0: the model's own precision


@register_recipe
@dataclass
class KVRecipe(Recipe):
    method: str
    model: dict[str, Any]
    ratio: float = 0.0  # the fraction of cached tokens removed, on average over layers and heads
    press: str = "streaming-llm"  # the press that scores tokens (transforms/kv/<press>.py)
    press_params: dict[str, Any] = field(default_factory=dict)
    phase: Literal["prefill", "decode"] = "prefill"  # compress after the prompt, or after every forward
    question_aware: bool = False  # compress after the question is read (evaluation runs it with the document)
    head_ratios: torch.Tensor | None = None  # [layers, kv heads]: each head's ratio (None: `ratio` everywhere)
    bits: int = 0  # KIVI quantization of the kept tokens: 8, 4 or 2 bits (0: none)
    group: int = 32  # tokens per key group (per channel) and channels per value group (per token)
    params: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    family = "kv"

    def __post_init__(self) -> None:
        from actlab.transforms.kv import get_press

        check_ratio(self.ratio)
        if self.phase not in ("prefill", "decode"):
            raise ConfigError(f"phase is 'prefill' (compress after the prompt) or 'decode' (after every forward), "
                              f"got {self.phase!r}")
        get_press(self.press, **self.press_params)  # unknown presses and bad parameters: one line
        if self.bits not in BITS:
            raise ConfigError(f"bits: KV quantization takes {', '.join(map(str, BITS[1:]))} bits (0: none), "
                              f"got {self.bits}")
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise ConfigError(f"group must be a whole number >= 1, got {self.group!r}")
        if self.head_ratios is not None:
            r = self.head_ratios
            if r.dim() != 2 or not r.is_floating_point():
                raise ConfigError(f"head_ratios: expected a [layers, kv heads] float tensor, got {tuple(r.shape)}")
            if not bool(((r >= 0) & (r < 1)).all()):
                raise ConfigError("head_ratios: every head's ratio must be in [0, 1)")
            self.head_ratios = r.double()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVRecipe:
        return schema.build(cls, d, "kv recipe")

    @property
    def evicts(self) -> bool:
        return self.ratio > 0 or (self.head_ratios is not None and bool((self.head_ratios > 0).any()))

    def describe(self) -> str:
        parts = []
        if self.evicts:
            parts.append(f"{self.press}@{self.ratio:g}" + ("/heads" if self.head_ratios is not None else "")
                         + ("" if self.phase == "prefill" else f"/{self.phase}"))
        if self.bits:
            parts.append(f"int{self.bits}")
        return f"kv:{self.method}[{','.join(parts) or 'full cache'}]"

    def make_press(self):
        from actlab.transforms.kv import get_press

        return get_press(self.press, **self.press_params)

    def ratios(self, adapter: Any) -> torch.Tensor:
        """Each layer's and KV head's ratio [layers, kv heads] (checked against the model's shape)."""
        shape = (adapter.num_layers, adapter.num_kv_heads)
        if self.head_ratios is None:
            return torch.full(shape, self.ratio, dtype=torch.float64)
        if tuple(self.head_ratios.shape) != shape:
            raise ConfigError(f"head_ratios: this recipe holds {tuple(self.head_ratios.shape)} layers x kv heads, "
                              f"the model has {shape}")
        return self.head_ratios

    # -- behaviour ---------------------------------------------------------------------------------------
    def attach(self, lm: Any, stack: contextlib.ExitStack) -> Any:
        from actlab.transforms.kv.session import KVSession

        self.ratios(lm.adapter)
        return KVSession.attached(lm, stack).add(self)

    def claims(self, lm: Any) -> list[Claim]:
        self.ratios(lm.adapter)
        return ([Claim(CACHE, "mask")] if self.evicts else []) + ([Claim(CACHE, "quantize")] if self.bits else [])

    def apply_cost(self, ledger: Any, lm: Any) -> None:
        ratios = self.ratios(lm.adapter)
        model_bits = next(lm.model.parameters()).element_size() * 8
        for i in range(lm.adapter.num_layers):
            entry = ledger.kv[layer_key(i)]
            entry.kept *= 1 - float(ratios[i].mean())
            if self.bits:  # codes, and a float16 scale and minimum per group
                entry.bytes_per_token *= (self.bits + 32 / self.group) / model_bits

    def export_hf(self, lm: Any) -> str:
        return "runtime"
