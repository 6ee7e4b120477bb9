"""Activation sparsity: the one protocol every method implements, and the recipe they all produce.

Budget semantics (used by every method and table): the *effective sparsity* is the parameter-weighted
fraction of linear-layer weight columns skipped per token (TEAL's definition),

    effective = sum_l params_l * dropped_l / sum_l params_l

over every projection of every layer (q, k, v, o, gate, up, down; GPT-2's fused qkv counts once),
excluding embeddings and the LM head. `dropped_l` is the fraction of input channels of projection l
that are zero, per token. For a rule computed on the activation output (`source="act"`, CATS/CHESS),
the down projection skips those input columns and the up projection skips the same output rows, so
both count; the gate projection stays dense.

A method turns calibration statistics into a `SparsityRecipe`: one `MaskRule` per projection it
sparsifies. Every rule keeps channel i of a token when its score beats a cutoff:

    score_i = |x_i| * scale_i        (scale_i = 1 when no per-channel scale is given)
    threshold: cutoff = a calibrated constant
    topk:      cutoff = the k-th largest score of the token (k = keep fraction * channels)
    relative:  cutoff = threshold * RMS of the token's scores (scale-free like topk, a variable count)
    gaussian:  cutoff = mean(score) + z * std(score) over the token's channels (statistical top-k)
    core:      (CoreInfer, `source="act"`) a fixed set per sequence, chosen at the prompt: the `keep`
               fraction of neurons most often among each prompt token's top-`alpha` scores

which is what the decode engine's kernels implement too (core and rank > 0 excepted). A rule with
`rank = r > 0` (R-Sparse) sends the dropped channels through the rank-r SVD approximation of the weight,
y = W (x * keep) + U_r S_r V_r^T (x * ~keep); the r (in + out) weights it reads count against the budget.
A core rule skips the gate projection's rows as well, since the set is known before the gate runs.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from actlab.errors import ConfigError
from actlab.fsutil import atomic_write_text
from actlab.models.adapter import ModelAdapter

RuleKind = Literal["threshold", "topk", "relative", "gaussian", "core"]
RECIPE_FORMAT = 1
ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "down")


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

    def scale_tensor(self, device=None, dtype=torch.float32) -> torch.Tensor | None:
        return None if self.scale is None else torch.tensor(self.scale, dtype=dtype, device=device)


@dataclass
class SparsityRecipe:
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

    def to_dict(self) -> dict[str, Any]:
        return {"format": RECIPE_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SparsityRecipe:
        d = dict(d)
        if d.pop("format", None) != RECIPE_FORMAT:
            raise ConfigError("not an actlab sparsity recipe (or one of an unknown format version)")
        d["rules"] = {k: MaskRule(**v) for k, v in d["rules"].items()}
        return cls(**d)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            atomic_write_text(path, json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SparsityRecipe:
        path = Path(path)
        try:
            text = path.read_text()
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read recipe {path}: {exc}") from exc
        return cls.from_dict(data)

    def check_model(self, adapter: ModelAdapter) -> None:
        mine = model_fingerprint(adapter)
        if self.model.get("fingerprint") != mine["fingerprint"]:
            raise ConfigError(
                f"this recipe was calibrated for {self.model.get('name', '?')} "
                f"({self.model.get('model_type')}, {self.model.get('layers')} layers, hidden "
                f"{self.model.get('hidden_size')}), not for this model ({mine['model_type']}, {mine['layers']} "
                f"layers, hidden {mine['hidden_size']}, weights {mine['fingerprint'][:12]}...)")


def model_fingerprint(adapter: ModelAdapter, name: str | None = None) -> dict[str, Any]:
    """Identity of a model's architecture and weights (a hash of shapes and a sample of weights)."""
    memo = getattr(adapter, "_actlab_fingerprint", None)
    if memo is not None:
        return {**memo, "name": name}
    h = hashlib.sha256()
    for lin in adapter.iter_linears():
        w = lin.weight().detach()
        h.update(str(tuple(w.shape)).encode())
        h.update(w.flatten()[:: max(1, w.numel() // 4096)].float().cpu().numpy().tobytes())
    d = adapter.describe()
    result = {"name": name, "model_type": d["model_type"], "layers": d["layers"], "hidden_size": d["hidden_size"],
              "fingerprint": h.hexdigest()}
    adapter._actlab_fingerprint = result  # weights are not expected to change under a loaded adapter
    return result


def token_rms(score: torch.Tensor) -> torch.Tensor:
    """RMS of each token's scores over its channels (last dimension, kept): the scale a relative rule's
    threshold multiplies. One definition for the masks, the decode engine and the calibration histograms."""
    return score.pow(2).mean(-1, keepdim=True).sqrt()


def check_target(target: float) -> float:
    if not isinstance(target, (int, float)) or math.isnan(target) or not 0.0 <= target < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {target}")
    return float(target)


# -- budget ----------------------------------------------------------------------------------------

def projection_params(adapter: ModelAdapter) -> dict[str, int]:
    """Parameters of every projection, keyed "L{i}.{role}" (the weights of the budget)."""
    return {f"L{layer.index}.{role}": lin.num_params for layer in adapter.layers for role, lin in layer.linears.items()}


def effective_sparsity(dropped: dict[str, float], params: dict[str, int]) -> float:
    total = sum(params.values())
    return sum(params[k] * dropped.get(k, 0.0) for k in params) / total


def lowrank_cost(rank: int, shape: tuple[int, int]) -> float:
    """Weights read by a rank-r factorisation of an [out, in] matrix, as a fraction of the matrix."""
    out_features, in_features = shape
    return rank * (in_features + out_features) / (in_features * out_features)


def dropped_by_rules(rules: dict[str, MaskRule], per_rule: dict[str, float],
                     shapes: dict[str, tuple[int, int]] | None = None) -> dict[str, float]:
    """Expand per-rule dropped fractions to projections: an act-rule on down also skips up's rows (a core
    rule also the gate's), and a low-rank correction reads back part of what was skipped (`shapes` needed)."""
    out = dict(per_rule)
    for key, rule in rules.items():
        if rule.source == "act" and key.endswith(".down") and key in per_rule:  # a core rule before any prompt: none
            prefix = key[: -len("down")]
            for role in ("up", "gate") if rule.kind == "core" else ("up",):
                out[prefix + role] = per_rule[key]
        if rule.rank and key in out:
            out[key] -= lowrank_cost(rule.rank, shapes[key])
    return out


def projection_shapes(adapter: ModelAdapter) -> dict[str, tuple[int, int]]:
    return {f"L{layer.index}.{role}": (lin.out_features, lin.in_features)
            for layer in adapter.layers for role, lin in layer.linears.items()}


# -- the protocol ----------------------------------------------------------------------------------

class Sparsifier(ABC):
    """A training-free activation-sparsity method: calibrate to a budget, produce a recipe.

    Subclasses set `name` and `paper` and implement `calibrate`. Attaching, measuring and saving are
    shared (`actlab.transforms.sparsity.masking.attach`, `SparsityRecipe.save`)."""

    name: ClassVar[str]
    paper: ClassVar[str]  # one line: the paper it re-derives, or "actlab" for our own
    needs_prompt: ClassVar[bool] = False  # its masks are chosen at a prompt (perplexity needs "last-half")

    @abstractmethod
    def calibrate(self, calib: Any, target: float) -> SparsityRecipe:
        """Turn calibration statistics (`CalibrationData`) into a recipe meeting `target`."""


def build_recipe(method: Sparsifier, calib: Any, target: float, rules: dict[str, MaskRule],
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


def projection_keys(adapter: ModelAdapter, roles: tuple[str, ...] = ROLES) -> list[str]:
    return [f"L{layer.index}.{role}" for layer in adapter.layers for role in layer.linears if role in roles]


def split_key(key: str) -> tuple[int, str]:
    """"L3.down" -> (3, "down"): the layer index and role a projection key names."""
    layer, role = key[1:].split(".")
    return int(layer), role


def projection_view(adapter: ModelAdapter, key: str):
    """The adapter's view (module, weight, shape) of the projection `key` names."""
    layer, role = split_key(key)
    return adapter.layers[layer].linears[role]
