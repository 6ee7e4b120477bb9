"""The statistic protocol: streaming, mergeable, serialisable, and rendered as tables.

A statistic keeps, per key (usually a site name or a layer), a dict of accumulator tensors. Each
field has a merge rule, so that `merge(A, B)` equals one pass over A and B together:
  "sum" (counts, sums), "min", "max", "chan" (Chan et al.'s pairwise update of count/mean/M2),
  or a statistic-specific rule implemented in `merge_key`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd
import torch

from actlab.probe.sites import Site

SEP = "|"


@dataclass
class BatchInfo:
    """What the statistics may know about the batch being run: its token ids and window numbers."""

    ids: torch.Tensor  # [batch, seq_len], on CPU
    window_index: torch.Tensor  # [batch]

    @property
    def seq_len(self) -> int:
        return self.ids.shape[1]


@dataclass
class TableContext:
    """Everything a statistic needs to render its tables beyond its own state."""

    decode: Any  # token id -> str
    sites: dict[str, Site] = field(default_factory=dict)


class Statistic(ABC):
    name: ClassVar[str]
    rules: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        self.acc: dict[str, dict[str, torch.Tensor]] = {}

    # -- streaming ---------------------------------------------------------------------------
    @abstractmethod
    def accepts(self, site: Site) -> bool: ...

    def allocate(self, sites: list[Site], adapter: Any, batch_size: int, seq_len: int) -> None:
        """Create every long-lived accumulator before the first forward pass.

        Tensors that outlive a forward pass but are born inside it pin the heap between the pass's
        large transient activations and fragment it (measured: +650 MB peak RSS on SmolLM2); allocated
        up front, with in-place updates afterwards, the profile's memory stays that of a bare forward.
        A statistic that does not override this still works, allocating lazily."""

    @staticmethod
    def empty_fields(spec: dict[str, tuple[tuple[int, ...], torch.dtype, float]]) -> dict[str, torch.Tensor]:
        return {name: torch.full(shape, fill, dtype=dtype) for name, (shape, dtype, fill) in spec.items()}

    @abstractmethod
    def update(self, site: Site, x: torch.Tensor, batch: BatchInfo) -> None: ...

    def finish_batch(self, batch: BatchInfo) -> None:
        """Called after a successful forward pass: work deferred until every site of the batch was seen."""

    def end_batch(self) -> None:
        """Drop per-batch scratch (tensors kept between sites of one forward pass); called even on errors."""

    # -- merging -----------------------------------------------------------------------------
    def merge(self, other: Statistic) -> None:
        if type(other) is not type(self) or other.settings() != self.settings():
            raise ValueError(f"cannot merge {self.name} statistics with different settings")
        for key, theirs in other.acc.items():
            mine = self.acc.get(key)
            if mine is None:
                self.acc[key] = {k: v.clone() for k, v in theirs.items()}
            else:
                self.acc[key] = self.merge_key(mine, theirs)

    def merge_key(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fold b into a *in place* (and return a): after the first batch no long-lived tensor is
        allocated again, which keeps the heap from fragmenting between large transient activations."""
        for name, value in b.items():  # a field only one side has (a site the other did not see) is kept
            if name not in a:
                a[name] = value.clone()
        if "chan" in self.rules.values():
            chan_merge_(a, b)
        for name, rule in self.rules.items():
            if name not in b:
                continue
            if rule == "sum":
                a[name].add_(b[name])
            elif rule == "min":
                torch.minimum(a[name], b[name], out=a[name])
            elif rule == "max":
                torch.maximum(a[name], b[name], out=a[name])
        return a

    def accumulate(self, key: str, fields: dict[str, torch.Tensor]) -> None:
        mine = self.acc.get(key)
        if mine is None:
            self.acc[key] = {k: v.clone() for k, v in fields.items()}
        else:
            self.merge_key(mine, fields)

    # -- serialisation -----------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {}

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{key}{SEP}{name}": t.contiguous() for key, fields in self.acc.items() for name, t in fields.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.acc = {}
        for flat, t in state.items():
            key, name = flat.rsplit(SEP, 1)
            self.acc.setdefault(key, {})[name] = t

    @abstractmethod
    def tables(self, ctx: TableContext) -> dict[str, pd.DataFrame]: ...


def chan_merge(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Combine (n, mean, m2) of two disjoint samples exactly (Chan, Golub & LeVeque 1979)."""
    na, nb = a["n"], b["n"]
    n = na + nb
    delta = b["mean"] - a["mean"]
    w = torch.where(n > 0, nb / n.clamp_min(1), torch.zeros_like(n))
    return {"n": n, "mean": a["mean"] + delta * w, "m2": a["m2"] + b["m2"] + delta**2 * na * w}


def chan_merge_(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """In-place `chan_merge`: a's n, mean and m2 become those of the union."""
    merged = chan_merge(a, b)
    for name in ("n", "mean", "m2"):
        a[name].copy_(merged[name])


def layer_of(key: str) -> int | None:
    head = key.split(".", 1)[0]
    return int(head[1:]) if head.startswith("L") and head[1:].isdigit() else None


def kind_of(key: str) -> str:
    return key.split(".", 1)[1] if "." in key else key
