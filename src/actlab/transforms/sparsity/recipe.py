"""The sparsity recipe: one `MaskRule` per sparsified projection, and everything needed to reproduce it.

Rule semantics are in `rules.py`. A rule with `rank = r > 0` (R-Sparse) sends the dropped channels through the
rank-r SVD approximation of the weight, y = W (x * keep) + U_r S_r V_r^T (x * ~keep). A rule with
`source="act"` is computed on act(gate) and applied there (the up rows and down columns of dropped neurons are
skipped). Activation sparsity is a runtime transform: it exports as the dense model with the recipe beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from actlab import schema
from actlab.errors import ConfigError
from actlab.models.adapter import ModelAdapter
from actlab.models.identity import require_same_model
from actlab.models.keys import projection_site, site_key, split_key
from actlab.transforms.base import Claim, Recipe, register_recipe
from actlab.transforms.sparsity.budget import dropped_by_rules, effective_sparsity, projection_params, projection_shapes

RuleKind = Literal["threshold", "topk", "relative", "gaussian", "core"]


@dataclass
class MaskRule:
    kind: RuleKind = "threshold"
    threshold: float = 0.0  # threshold: keep score > threshold; relative: keep score > threshold * RMS(score)
    keep: float = 1.0  # topk: fraction of channels kept per token
    z: float = 0.0  # gaussian: cutoff = mean + z * std of the token's scores
    scale: list[float] | None = None  # per-channel score multiplier
    source: Literal["input", "act"] = "input"  # "act": computed on act(gate), applied there (skips up rows)
    rank: int = 0  # R-Sparse: the dropped channels go through a rank-`rank` SVD approximation of W
    alpha: float = 0.0  # core: fraction of a token's neurons that are its token-wise core

    def __post_init__(self) -> None:
        if hasattr(self.scale, "tolist"):  # a tensor from a recipe's sidecar
            self.scale = self.scale.tolist()
        if not 0.0 <= self.keep <= 1.0 or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"keep and alpha must be in [0, 1], got keep={self.keep}, alpha={self.alpha}")
        if self.rank < 0:
            raise ConfigError(f"rank must be >= 0, got {self.rank}")

    def scale_tensor(self, device=None, dtype=None):
        import torch

        return None if self.scale is None else torch.tensor(self.scale, dtype=dtype or torch.float32, device=device)


@register_recipe
@dataclass
class SparsityRecipe(Recipe):
    """Everything needed to reproduce a sparsification exactly: rules per projection, and provenance."""

    method: str
    target: float
    model: dict[str, Any]
    rules: dict[str, MaskRule]  # "L{i}.{role}" -> rule
    positions: Literal["all", "last-half"] = "all"
    dense_prefix: int = 0  # the first positions of every sequence stay dense (e.g. 1: the attention sink)
    params: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    predicted: dict[str, float] = field(default_factory=dict)  # dropped fraction per projection, on calibration
    bias: dict[str, list[float]] = field(default_factory=dict)  # optional output compensation per projection
    family = "sparsity"

    def __post_init__(self) -> None:
        if not 0.0 <= self.target < 1.0:
            raise ConfigError(f"target: sparsity must be in [0, 1), got {self.target}")
        if self.dense_prefix < 0:
            raise ConfigError(f"dense_prefix must be >= 0, got {self.dense_prefix}")
        for name, values in self.bias.items():
            if hasattr(values, "tolist"):
                self.bias[name] = values.tolist()

    # -- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SparsityRecipe:
        d = dict(d)
        if d.pop("format", None) == 1 and "fingerprint" not in d.get("model", {}):
            raise ConfigError("not an actlab sparsity recipe (format 1 without a model fingerprint)")
        return schema.build(cls, d, "sparsity recipe")

    # -- identity -------------------------------------------------------------------------------------
    def check_model(self, lm: Any) -> None:
        if "weights_sha256" not in self.model:  # a round-1 recipe: identified by a sample of the projections
            mine = legacy_fingerprint(lm.adapter)
            if self.model.get("fingerprint") != mine:
                raise ConfigError(
                    f"this recipe was calibrated for {self.model.get('name', '?')} ({self.model.get('model_type')}, "
                    f"{self.model.get('layers')} layers, hidden {self.model.get('hidden_size')}), not for this model "
                    f"({lm.identity.short()})")
            return
        require_same_model(self.model, lm.identity, f"this sparsity recipe ({self.method}) was calibrated")

    # -- behaviour --------------------------------------------------------------------------------------
    def attach(self, lm: Any, stack: contextlib.ExitStack) -> Any:
        from actlab.transforms.sparsity.attach import SparsityMeter, sparsity_editor

        meter = SparsityMeter(recipe=self)
        stack.enter_context(sparsity_editor(lm, self, meter))
        return meter

    def claims(self, lm: Any) -> list[Claim]:
        self.check_keys(lm.adapter)
        out = []
        for key, rule in self.rules.items():
            layer, _ = split_key(key)
            site = site_key(layer, "act") if rule.source == "act" else projection_site(key, "in")
            out.append(Claim(site, "mask"))
            if rule.rank or key in self.bias:
                out.append(Claim(projection_site(key, "out"), "add"))
        return out

    def check_keys(self, adapter: ModelAdapter) -> None:
        """Every rule names a projection this model has (one-line error otherwise)."""
        shapes = projection_shapes(adapter)
        for key, rule in {**self.rules, **dict.fromkeys(self.bias)}.items():
            if key not in shapes:
                raise ConfigError(f"rule for {key}: this model has no such projection (layers "
                                  f"0-{adapter.num_layers - 1}, roles {', '.join(adapter.layers[0].linears)})")
            if rule is not None and rule.source == "act" and split_key(key)[1] != "down":
                raise ConfigError(f"rule for {key}: an activation rule (source act) is keyed by the layer's down "
                                  "projection")
            if rule is not None and rule.scale is not None:
                width = adapter.intermediate_size if rule.source == "act" else shapes[key][1]
                if len(rule.scale) != width:
                    raise ConfigError(f"rule for {key}: scale has {len(rule.scale)} values, the input has {width} "
                                      "channels")
        for key, values in self.bias.items():
            if len(values) != shapes[key][0]:
                raise ConfigError(f"bias for {key}: {len(values)} values, the output has {shapes[key][0]}")

    def apply_cost(self, ledger: Any, lm: Any) -> None:
        dropped = {k: v for k, v in self.predicted.items() if k != "effective"}
        if not dropped:  # a hand-made recipe: nothing predicted, nothing claimed
            return
        for key, frac in dropped.items():
            if key in ledger.parts:
                ledger.parts[key].read *= max(0.0, 1.0 - frac)

    def describe(self) -> str:
        return f"sparsity:{self.method}@{self.target:g}"

    def engine_plan(self, lm: Any) -> Any:
        return self


def legacy_fingerprint(adapter: ModelAdapter) -> str:
    """Round 1's recipe fingerprint (shapes and a sample of every projection's weights), to check old recipes."""
    h = hashlib.sha256()
    for lin in adapter.iter_linears():
        w = lin.weight().detach()
        h.update(str(tuple(w.shape)).encode())
        h.update(w.flatten()[:: max(1, w.numel() // 4096)].float().cpu().numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(adapter: ModelAdapter, name: str | None = None) -> dict[str, Any]:
    """The identity a recipe records for the model owning `adapter` (its `LoadedModel.identity`)."""
    return {**adapter.identity.to_dict(), "name": name}


def build_recipe(method: Any, calib: Any, target: float, rules: dict[str, MaskRule],
                 predicted: dict[str, float], **extra: Any) -> SparsityRecipe:
    """A recipe with provenance: model identity, calibration data and the predicted per-projection drops."""
    adapter = calib.lm.adapter
    params = projection_params(adapter)
    expanded = dropped_by_rules(rules, predicted, projection_shapes(adapter))
    return SparsityRecipe(
        method=method.name, target=target, model=model_fingerprint(adapter, calib.lm.name), rules=rules,
        params=json.loads(json.dumps({k: v for k, v in vars(method).items() if not k.startswith("_")})),  # as saved
        calibration=calib.describe(), predicted={**expanded, "effective": effective_sparsity(expanded, params)},
        **extra)
