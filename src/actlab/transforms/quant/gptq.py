"""GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): quantize a projection's input channels one at a time and push each one's rounding error onto
the channels not yet quantized, so that the layer's output on calibration inputs moves least.

Derivation. For one output row w and inputs X, the loss ||(w - q) X^T||^2 = (w - q) H (w - q)^T with
H = X^T X. Quantizing channel i and re-optimizing the remaining channels F exactly (Optimal Brain
Surgeon) moves them by  -(w_i - q_i) / [H_F^-1]_ii * [H_F^-1]_{i,:}.  Processing channels in a fixed order,
the rows of H_F^-1 for every step are the rows of the upper Cholesky factor U of H^-1 (scaled by U_ii), so
one factorization serves all steps and all output rows at once:

    err_i = (w_i - q_i) / U_ii ;   w_j -= err_i * U_ij   for j > i.

Lazy batch updates: the updates inside a block of 128 channels are applied at once, the rest of the matrix
is updated once per block (W[:, later] -= Err U[block, later]), which is the same arithmetic with far less
memory traffic. H is damped by `damp` x mean(diag H); channels never seen (H_ii = 0) are zeroed. Act order
quantizes the channels with the largest H_ii first; with groups, each group's scale is fitted beforehand on
the original weights (static groups), so the groups stay contiguous along the input dimension (what the
engine's kernels and GGUF read). Without act order a group's scale is fitted when its first channel comes up,
on the weights as updated so far.

Calibration is sequential as in the paper: each layer is quantized on inputs that went through the already
quantized layers before it, and inside a layer the projections reading one input are quantized together,
in the order the layer computes them (q, k, v; o; gate, up; down).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from actlab.models.keys import projection_key
from actlab.models.weights import swapped
from actlab.progress import track
from actlab.transforms.quant.base import QuantMethod, input_groups
from actlab.transforms.quant.grid import Grid, Quantized, decode, encode, fake_quantize, fit
from actlab.transforms.quant.recipe import HEAD, QuantRecipe, entry, entry_quantized


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, grid: Grid, block: int = 128, damp: float = 0.01,
                  act_order: bool = False) -> Quantized:
    """W [out, in] quantized on `grid` by GPTQ with H = X^T X [in, in] of its calibration inputs."""
    W = w.detach().double().clone()
    H = hessian.detach().double().clone()
    out, cols = W.shape
    g = grid.group_size(cols)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if grid.group == 0 or act_order:  # scales fitted up front: per channel, or static groups
        scale, offset = (t.double() if t is not None else None for t in fit(W, grid))
    else:
        scale = torch.zeros(out, cols // g, dtype=torch.float64)
        offset = None if grid.symmetric else torch.zeros_like(scale)
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, order], H[order][:, order]
    H += damp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(out, cols, dtype=torch.uint8)
    one = Grid(grid.bits, 1, grid.symmetric)  # encode / decode one column with its group's scale
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        err = torch.zeros(out, stop - start, dtype=W.dtype)
        for j in range(start, stop):
            col = int(order[j])
            group = col // g
            if not act_order and grid.group and col % g == 0:  # first channel of a group: fit on current weights
                s, o = fit(W[:, j:j + g], Grid(grid.bits, 0, grid.symmetric))
                scale[:, group] = s[:, 0]
                if offset is not None:
                    offset[:, group] = o[:, 0]
            s_col = scale[:, group:group + 1]
            o_col = offset[:, group:group + 1] if offset is not None else None
            c = encode(W[:, j:j + 1], one, s_col, o_col)
            q = decode(c, one, s_col, o_col).double()[:, 0]
            codes[:, col] = c[:, 0]
            e = (W[:, j] - q) / U[j, j]
            W[:, j + 1:stop] -= e[:, None] * U[j, j + 1:stop][None, :]
            err[:, j - start] = e
        W[:, stop:] -= err @ U[start:stop, stop:]
    return Quantized(grid, codes, scale.float(), offset.float() if offset is not None else None)  # float16 values


def reconstruction_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - W_hat) X^T||_F^2 = tr(D H D^T) with D = W - W_hat, H = X^T X."""
    d = (w.double() - w_hat.double())
    return float(((d @ hessian.double()) * d).sum())


class HessianAccumulator:
    """H = sum of x x^T over every token seen at one module's input."""

    def __init__(self, size: int):
        self.H = torch.zeros(size, size, dtype=torch.float64)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.H += x.T @ x
        self.tokens += x.shape[0]


def _layer_input(call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _layer_output(module: torch.nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    """The layer's output on `hidden` with the rest of its recorded call (masks, positions) as it was."""
    args, kwargs = call
    out = module(hidden, *args[1:], **kwargs) if args else module(**{**kwargs, "hidden_states": hidden})
    return out[0] if isinstance(out, tuple) else out


@dataclass
class GPTQ(QuantMethod):
    name = "gptq"
    paper = "Frantar et al. 2023, GPTQ (arXiv:2210.17323)"
    block: int = 128
    damp: float = 0.01
    act_order: bool = False
    tokens: int = 4096  # calibration tokens the Hessians are taken on
    sequential: bool = True  # each projection's inputs through the quantized projections before it (False: all
    # Hessians from the unquantized model, as in one pass)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "block": self.block, "damp": self.damp, "act_order": self.act_order,
                "tokens": self.tokens, "sequential": self.sequential}

    def calibrate(self, calib: Any, target: float | None = None, grids: dict[str, Grid] | None = None) -> QuantRecipe:
        lm = calib.lm
        grids = grids or dict.fromkeys(self.targets(lm), self.grid())
        self.check_grid(lm, grids)
        weights: dict[str, dict[str, Any]] = {}
        errors: dict[str, dict[str, float]] = {}
        calls = calib.layer_replay(self.tokens)
        hidden = _layer_input(calls[0])
        with torch.no_grad(), contextlib.ExitStack() as quantized:
            for layer in track(lm.adapter.layers, total=lm.adapter.num_layers, description="gptq",
                               enabled=self.progress):
                call = calls[layer.index]
                inputs = hidden if self.sequential else _layer_input(call)
                for roles in input_groups(layer):
                    keys = [projection_key(layer.index, r) for r in roles if projection_key(layer.index, r) in grids]
                    if not keys:
                        continue
                    hessians = self._hessians(layer, roles, inputs, call)
                    for role, key in zip(roles, keys):
                        view = layer.linears[role]
                        weights[key], errors[key] = self._quantize(view, hessians[id(view.module)], grids[key])
                    if not self.sequential:
                        continue
                    for module, weight in QuantRecipe(self.name, lm.identity.to_dict(),
                                                      {k: weights[k] for k in keys}).module_weights(lm):
                        quantized.enter_context(swapped(module, "weight", weight))
                hidden = _layer_output(layer.module, inputs, call)
            if HEAD in grids:
                x = lm.adapter.final_norm(hidden)
                acc = HessianAccumulator(x.shape[-1])
                acc.add(x)
                view = self.targets(lm)[HEAD]
                weights[HEAD], errors[HEAD] = self._quantize(view, acc.H, grids[HEAD])
        return self.recipe(calib, weights, {"reconstruction_error": errors, "tokens": int(hidden[..., 0].numel())},
                           target)

    def _hessians(self, layer: Any, roles: list[str], inputs: torch.Tensor, call: tuple) -> dict[int, torch.Tensor]:
        """H of each module the roles live in (one per module: fused q/k/v share theirs), on one layer call."""
        accs: dict[int, HessianAccumulator] = {}
        with contextlib.ExitStack() as hooks:
            for role in roles:
                module = layer.linears[role].module
                if id(module) in accs:
                    continue
                acc = accs[id(module)] = HessianAccumulator(layer.linears[role].in_features)
                hooks.callback(module.register_forward_pre_hook(lambda m, args, a=acc: a.add(args[0])).remove)
            _layer_output(layer.module, inputs, call)
        return {k: a.H for k, a in accs.items()}

    def _quantize(self, view: Any, H: torch.Tensor, grid: Grid) -> tuple[dict[str, Any], dict[str, float]]:
        w = view.weight().detach().float()
        q = gptq_quantize(w, H, grid, self.block, self.damp, self.act_order)
        e = entry(q)
        return e, {"gptq": reconstruction_error(w, entry_quantized(e).dequantize(), H),
                   "rtn": reconstruction_error(w, fake_quantize(w, grid), H)}
