"""mixed: actlab's own mixed precision - bits per projection allocated under an average-bits budget by the
expected loss each choice costs (the loss-aware idea of the sparsity family, applied to rounding error).

Derivation. Rounding projection p's weights moves its outputs by d_t = (W - Q_b(W)) x_t. With output
gradient g = dL/dy and a diagonal (empirical) Fisher, the expected loss increase is

    dL_p(b) ~ 1/2 sum_o E[g_o^2] E[(D x)_o^2] = 1/2 sum_o G_o (D C D^T)_oo,   D = W - Q_b(W), C = E[x x^T],

with G_o = E over windows of sum over a window's tokens of g_o^2 (L is a window's mean loss) and C over every
calibration token: one backward pass and one forward pass, whatever the number of candidates. Choosing b_p
from `candidates` to minimise sum_p dL_p(b_p) under sum_p n_p b_p <= avg_bits * sum_p n_p is a
multiple-choice knapsack: a Lagrange multiplier lambda picks argmin_b dL_p(b) + lambda n_p b for every
projection at once; bisection on lambda meets the budget, and the bits left over go to the upgrades that buy
the most loss per bit. Unlike the layer-wise ranking baseline (`layerwise`), each projection (q, k, v, o,
gate, up, down) gets its own precision, and the gradient carries every downstream layer's sensitivity.

The chosen grids are then quantized by RTN, GPTQ or AWQ (`quantizer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from actlab.errors import ConfigError
from actlab.models.keys import projection_key
from actlab.progress import track
from actlab.transforms.quant.base import QuantMethod, input_groups
from actlab.transforms.quant.grid import Grid, fake_quantize
from actlab.transforms.quant.recipe import HEAD, QuantRecipe
from actlab.transforms.quant.rtn import rtn_weights

QUANTIZERS = ("rtn", "gptq", "awq")


def rounding_loss(w: torch.Tensor, grid: Grid, moment: torch.Tensor, grad_energy: torch.Tensor) -> float:
    """1/2 sum_o G_o (D C D^T)_oo for D = W - Q(W) on `grid`: the expected loss increase of rounding W."""
    d = (w.float() - fake_quantize(w.float(), grid)).double()
    return 0.5 * float(((d @ moment.double()) * d).sum(dim=1) @ grad_energy.double())


def check_budget(avg_bits: Any, candidates: tuple[int, ...]) -> float:
    if isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, float)):
        raise ConfigError(f"--avg-bits must be a number, got {avg_bits!r}")
    lo, hi = min(candidates), max(candidates)
    if avg_bits < lo:
        raise ConfigError(f"an average of {avg_bits:g} bits is below the lowest precision on offer ({lo} bits); "
                          f"give --avg-bits from {lo} to {hi}")
    if avg_bits > hi:
        raise ConfigError(f"an average of {avg_bits:g} bits is above the highest precision on offer ({hi} bits); "
                          f"give --avg-bits from {lo} to {hi}")
    return float(avg_bits)


def allocate_bits(losses: dict[str, dict[int, float]], params: dict[str, int], avg_bits: float) -> dict[str, int]:
    """Bits per key minimising the summed loss with sum params * bits <= avg_bits * sum params."""
    budget = avg_bits * sum(params.values())
    options = {k: sorted(v) for k, v in losses.items()}

    def choose(lam: float) -> dict[str, int]:
        return {k: min(options[k], key=lambda b: (losses[k][b] + lam * params[k] * b, b)) for k in losses}

    def used(choice: dict[str, int]) -> float:
        return sum(params[k] * b for k, b in choice.items())

    lo, hi = 0.0, 1.0
    while used(choose(hi)) > budget:
        hi *= 4
        if hi > 1e30:
            break
    if used(choose(lo)) <= budget:
        hi = lo
    for _ in range(100):
        if hi - lo <= 1e-12 * hi:
            break
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if used(choose(mid)) <= budget else (mid, hi)
    choice = choose(hi)
    if used(choice) > budget:  # the cheapest choice everywhere (the budget is at the lowest precision)
        choice = {k: options[k][0] for k in losses}
    while True:  # spend what is left on the upgrades that buy the most loss per bit
        left = budget - used(choice)
        best, best_gain = None, 0.0
        for k, b in choice.items():
            for up in (u for u in options[k] if u > b):
                extra = params[k] * (up - b)
                gain = (losses[k][b] - losses[k][up]) / extra
                if extra <= left + 1e-9 and gain > best_gain:
                    best, best_gain = (k, up), gain
        if best is None:
            return choice
        choice[best[0]] = best[1]


def quantize_grids(method: QuantMethod, calib: Any, grids: dict[str, Grid], quantizer: str) -> QuantRecipe:
    """The recipe of `grids` (a grid per key) quantized by RTN, GPTQ or AWQ."""
    if quantizer in ("gptq", "awq"):
        from actlab.transforms.quant import METHODS

        chosen = METHODS[quantizer](bits=method.bits, group=method.group, symmetric=method.symmetric,
                                    head=method.head, progress=method.progress)
        return chosen.calibrate(calib, grids=grids)
    weights = rtn_weights(method.targets(calib.lm), grids, method.progress)
    return QuantRecipe("rtn", calib.lm.identity.to_dict(), weights)


def parse_candidates(value: Any) -> tuple[int, ...]:
    items = value.split(",") if isinstance(value, str) else ([value] if isinstance(value, int) else list(value))
    try:
        bits = tuple(sorted({int(b) for b in items}))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"candidates must be bit widths such as 2,3,4,8, got {value!r}") from exc
    for b in bits:
        Grid(b)
    if not bits:
        raise ConfigError("candidates: give at least one bit width")
    return bits


@dataclass
class MixedPrecision(QuantMethod):
    name = "mixed"
    paper = "actlab (loss-aware bit allocation; docs/quantization.md)"
    mixed = True
    candidates: Any = "2,3,4,5,6,8"
    quantizer: str = "rtn"
    grad_windows: int = 0  # windows for the output gradients (0: every calibration window)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.candidates = parse_candidates(self.candidates)
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got {self.quantizer!r}")

    def params(self) -> dict[str, Any]:
        return {**super().params(), "candidates": list(self.candidates), "quantizer": self.quantizer,
                "grad_windows": self.grad_windows}

    def calibrate(self, calib: Any, target: float | None = None) -> QuantRecipe:
        if target is None:
            raise ConfigError("mixed precision needs --avg-bits (the average code bits per weight)")
        avg = check_budget(target, self.candidates)
        lm = calib.lm
        self.check_grid(lm)
        views = self.targets(lm)
        losses = self.losses(calib, views)
        params = {k: v.num_params for k, v in views.items()}
        bits = allocate_bits(losses, params, avg)
        grids = {k: Grid(b, self.group, self.symmetric) for k, b in bits.items()}
        quantized = quantize_grids(self, calib, grids, self.quantizer)
        return self.recipe(calib, quantized.weights, {"bits": bits, "expected_loss": {
            k: losses[k][b] for k, b in bits.items()}, "quantizer": self.quantizer}, target=avg)

    def losses(self, calib: Any, views: dict[str, Any]) -> dict[str, dict[int, float]]:
        """Expected loss increase of every candidate precision of every target."""
        lm = calib.lm
        reps = {}  # one input moment per group of projections reading one input
        for layer in lm.adapter.layers:
            for roles in input_groups(layer):
                for r in roles:
                    reps[projection_key(layer.index, r)] = projection_key(layer.index, roles[0])
        moments = calib.input_moments(sorted(set(reps.values())), progress=self.progress)
        grads = calib.output_grad_rms(self.grad_windows or None, progress=self.progress)
        seq = calib.windows.shape[1]
        if HEAD in views:
            moments[HEAD] = _head_moment(calib)
            reps[HEAD] = HEAD
            grads = {**grads, HEAD: _head_grad(calib)}
        out: dict[str, dict[int, float]] = {}
        for key in track(list(views), total=len(views), description="sensitivity", enabled=self.progress):
            w = views[key].weight().detach().float()
            energy = grads[key].double() ** 2 * seq  # E over windows of the sum over a window's tokens
            out[key] = {b: rounding_loss(w, Grid(b, self.group, self.symmetric), moments[reps[key]], energy)
                        for b in self.candidates}
        return out


def _head_moment(calib: Any) -> torch.Tensor:
    lm = calib.lm
    sums, count = None, 0

    def hook(_m, args):
        nonlocal sums, count
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        sums = x.T @ x if sums is None else sums + x.T @ x
        count += x.shape[0]

    handle = lm.adapter.lm_head.register_forward_pre_hook(hook)
    try:
        with torch.no_grad(), calib.attached(calib.applied()):
            for w in calib.local():
                lm.model(input_ids=w[None].to(lm.device), use_cache=False)
    finally:
        handle.remove()
    width = lm.adapter.hidden_size
    sums = sums if sums is not None else torch.zeros(width, width)
    n = torch.tensor(count, dtype=torch.float64)
    calib.reduce(sums, n)
    return sums / float(n)


def _head_grad(calib: Any) -> torch.Tensor:
    """RMS over tokens of dL/dlogits: softmax - onehot, divided by the window's predicted tokens."""
    import torch.nn.functional as F

    lm = calib.lm
    total, count = None, 0
    with torch.no_grad(), calib.attached(calib.applied()):
        for w in calib.local():
            ids = w[None].to(lm.device)
            logits = lm.model(input_ids=ids, use_cache=False).logits[0].float()
            g = F.softmax(logits[:-1], dim=-1)
            g[torch.arange(g.shape[0]), ids[0, 1:]] -= 1.0
            g = torch.cat([g, torch.zeros_like(g[:1])]) / (ids.shape[1] - 1)
            sq = g.double().pow(2).sum(0)
            total = sq if total is None else total + sq
            count += ids.shape[1]
    total = total if total is not None else torch.zeros(lm.adapter.vocab_size, dtype=torch.float64)
    n = torch.tensor(count, dtype=torch.float64)
    calib.reduce(total, n)
    return (total / float(n)).sqrt().float()


__all__ = ["MixedPrecision", "allocate_bits", "check_budget", "parse_candidates", "quantize_grids", "rounding_loss"]
