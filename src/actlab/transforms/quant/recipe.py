"""The quantization recipe: each quantized projection's codes and scales, exactly as a method produced them.

    weights: {"L3.q": {"bits": 4, "group": 128, "symmetric": false, "shape": [576, 576],
                       "codes": <uint8, two 4-bit codes a byte>, "scale": <[out, groups]>, "offset": <...>,
                       "input_scale": <[in]>   (AWQ, SmoothQuant: the codes are of W diag(s))
                       "act_bits": 8           (SmoothQuant W8A8: inputs quantized per token)}, ...,
              "lm_head": {...}}

The weight a projection computes with is decode(codes) diag(1/s): attaching swaps it in (the original tensor
objects come back when the stack closes); an input scale s is folded into that weight, and activation
quantization is an edit at the projection's input (x -> s * Q(x / s), so that Q(x / s) meets the codes of
W diag(s)). Exports fold the dequantized weights into an HF directory (activation quantization is runtime
only) and write GGUF's quantized types (export/gguf.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from actlab import schema
from actlab.errors import ConfigError
from actlab.models.adapter import LinearView, replace_rows
from actlab.models.keys import projection_site, split_key
from actlab.models.weights import swapped
from actlab.probe.edit import Edit, Editor
from actlab.transforms.base import Claim, Recipe, register_recipe
from actlab.transforms.quant.grid import Grid, Quantized, decode, fake_quantize_tokens, pack, unpack

HEAD = "lm_head"
QUANT_GRIDS = "_actlab_quant_grids"  # set on a folded copy's modules: the grids of the views they hold


def entry(q: Quantized, input_scale: torch.Tensor | None = None, act_bits: int | None = None) -> dict[str, Any]:
    """A recipe entry for `q` (codes of W diag(input_scale) when given)."""
    out: dict[str, Any] = {"bits": q.grid.bits, "group": q.grid.group, "symmetric": q.grid.symmetric,
                           "shape": list(q.codes.shape), "codes": pack(q.codes, q.grid.bits),
                           "scale": q.scale.half().contiguous()}  # float16 values already (grid.fit)
    if q.offset is not None:
        out["offset"] = q.offset.half().contiguous()
    if input_scale is not None:
        out["input_scale"] = input_scale.float().contiguous()
    if act_bits is not None:
        out["act_bits"] = int(act_bits)
    return out


def entry_grid(e: dict[str, Any]) -> Grid:
    return Grid(e["bits"], e["group"], e["symmetric"])


def entry_quantized(e: dict[str, Any]) -> Quantized:
    offset = e.get("offset")
    return Quantized(entry_grid(e), unpack(e["codes"], e["bits"]), e["scale"].float(),
                     None if offset is None else offset.float())


def effective_weight(e: dict[str, Any]) -> torch.Tensor:
    """The float32 [out, in] weight the projection computes with: decode(codes) diag(1 / input_scale)."""
    q = entry_quantized(e)
    w = decode(q.codes, q.grid, q.scale, q.offset)
    s = e.get("input_scale")
    return w / s[None, :] if s is not None else w


def target_view(lm: Any, key: str) -> LinearView:
    """The projection `key` names ("L3.q", or "lm_head")."""
    ad = lm.adapter
    if key == HEAD:
        return LinearView(HEAD, ad.lm_head)
    layer, role = split_key(key)
    if layer >= ad.num_layers or role not in ad.layers[layer].linears:
        raise ConfigError(f"weights: {key} is not a projection of this model")
    return ad.layers[layer].linears[role]


def _check_entry(key: str, e: Any) -> None:
    where = f"weights.{key}"
    if not isinstance(e, dict):
        raise ConfigError(f"{where}: expected a mapping")
    for name in ("bits", "group", "symmetric", "shape", "codes", "scale"):
        if name not in e:
            raise ConfigError(f"{where}: missing {name!r}")
    try:
        grid = entry_grid(e)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    shape = e["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) and n > 0 for n in shape)):
        raise ConfigError(f"{where}.shape: expected [out, in], got {shape!r}")
    out, cols = shape
    groups = cols // grid.group_size(cols, key)
    packed = [out, cols // 2] if grid.bits <= 4 else [out, cols]
    tensors = {"codes": (packed, torch.uint8), "scale": ([out, groups], None)}
    if not grid.symmetric:
        tensors["offset"] = ([out, groups], None)
    if "input_scale" in e:
        tensors["input_scale"] = ([cols], None)
    for name, (want, dtype) in tensors.items():
        t = e.get(name)
        if not torch.is_tensor(t):
            raise ConfigError(f"{where}: missing the tensor {name!r}")
        if list(t.shape) != want or (dtype is not None and t.dtype != dtype):
            raise ConfigError(f"{where}.{name}: expected {dtype or 'float'} {want}, got {t.dtype} {list(t.shape)}")
    if "act_bits" in e and not (isinstance(e["act_bits"], int) and 2 <= e["act_bits"] <= 8):
        raise ConfigError(f"{where}.act_bits: must be an integer from 2 to 8")


@register_recipe
@dataclass
class QuantRecipe(Recipe):
    method: str
    model: dict[str, Any]
    weights: dict[str, dict[str, Any]]  # projection key ("L3.q") or "lm_head" -> entry()
    target: float = 0.0  # average code bits the method was asked for
    params: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    family = "quant"

    def __post_init__(self) -> None:
        if not self.weights:
            raise ConfigError("quant recipe: weights is empty (nothing is quantized)")
        for key, e in self.weights.items():
            if key != HEAD:
                split_key(key)
            _check_entry(key, e)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantRecipe:
        return schema.build(cls, d, "quant recipe")

    def describe(self) -> str:
        if "_label" not in self.__dict__:  # asked once per claim when a composition is validated: computed once
            grids = sorted({entry_grid(e).describe() for e in self.weights.values()})
            act = " a8" if any("act_bits" in e for e in self.weights.values()) else ""
            label = grids[0] if len(grids) == 1 else f"{self.average_bits():.2f} bits mixed"
            self.__dict__["_label"] = f"quant:{self.method}[{label}{act}]"
        return self.__dict__["_label"]

    def average_bits(self) -> float:
        """Code bits per quantized weight, weighted by parameters."""
        total = sum(e["shape"][0] * e["shape"][1] for e in self.weights.values())
        return sum(e["bits"] * e["shape"][0] * e["shape"][1] for e in self.weights.values()) / total

    def grids(self) -> dict[str, Grid]:
        return {k: entry_grid(e) for k, e in self.weights.items()}

    def check_shapes(self, lm: Any) -> None:
        for key, e in self.weights.items():
            view = target_view(lm, key)
            have = [view.out_features, view.in_features]
            if have != e["shape"]:
                raise ConfigError(f"weights: {key} is {have} in this model, the recipe's is {e['shape']}")

    # -- behaviour -----------------------------------------------------------------------------------------
    def module_weights(self, lm: Any) -> list[tuple[torch.nn.Module, torch.Tensor]]:
        """Each affected module with its new weight (in its own layout; a fused module's other rows kept)."""
        self.check_shapes(lm)
        by_module: dict[int, tuple[torch.nn.Module, bool, list[tuple[LinearView, torch.Tensor]]]] = {}
        for key, e in self.weights.items():
            view = target_view(lm, key)
            by_module.setdefault(id(view.module), (view.module, view.transposed, []))[2].append(
                (view, effective_weight(e)))
        out = []
        for module, transposed, parts in by_module.values():
            full = module.weight.detach()
            full = (full.t() if transposed else full).float()
            for view, new in parts:
                full = new if view.rows is None else replace_rows(full.t(), view.rows, new.t()).t()
            full = full.t() if transposed else full
            out.append((module, full.to(module.weight.dtype).contiguous()))
        return out

    def attach(self, lm: Any, stack: contextlib.ExitStack) -> None:
        for module, weight in self.module_weights(lm):
            stack.enter_context(swapped(module, "weight", weight))
        edits = [Edit(projection_site(key, "in"), _quantize_input(e["act_bits"], e.get("input_scale")))
                 for key, e in self.weights.items() if "act_bits" in e]
        if edits:
            stack.enter_context(Editor(lm, edits))

    def claims(self, lm: Any) -> list[Claim]:
        self.check_shapes(lm)
        out = [Claim(f"weights:{key}", "weights") for key in self.weights]
        out += [Claim(projection_site(key, "in"), "quantize") for key, e in self.weights.items() if "act_bits" in e]
        return out

    def apply_cost(self, ledger: Any, lm: Any) -> None:
        for key, e in self.weights.items():
            ledger.parts[key].bits = entry_grid(e).bits_per_weight(e["shape"][1])

    def export_hf(self, lm: Any) -> str:
        if any("act_bits" in e for e in self.weights.values()):
            return "runtime"  # the weights fold, the per-token activation quantization does not
        return "weights"

    def fold_into(self, lm: Any, model: Any) -> Any:
        """`model` (a copy of lm.model) with every quantized projection's dequantized weight written in."""
        from actlab.models.adapter import adapter_for

        copy = _Twin(lm, adapter_for(model))
        for module, weight in self.module_weights(copy):
            module.weight = torch.nn.Parameter(weight, requires_grad=False)  # a tied head gets its own
        for key, e in self.weights.items():  # GGUF export writes each matrix in the type its grid maps to
            module = target_view(copy, key).module
            grids = getattr(module, QUANT_GRIDS, [])
            setattr(module, QUANT_GRIDS, [*grids, entry_grid(e)])
        if HEAD in self.weights and getattr(model.config, "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False  # the embedding stays in float, the head is quantized
        return model


@dataclass
class _Twin:
    """The loaded model's identity with another adapter (the copy an export folds into)."""

    lm: Any
    adapter: Any


def _quantize_input(bits: int, input_scale: torch.Tensor | None):
    if input_scale is None:
        return lambda x, ctx: fake_quantize_tokens(x, bits)

    def op(x, ctx):
        s = input_scale.to(x.device, torch.float32)
        return (fake_quantize_tokens(x.float() / s, bits) * s).to(x.dtype)
    return op
