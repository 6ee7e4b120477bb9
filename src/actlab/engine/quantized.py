"""Engine projections on a quant recipe's codes: 8-bit (a byte per weight) or 4-bit (two a byte; 2- and 3-bit
grids are held as 4-bit) grouped-weight kernels (csrc/quant_gemv.cpp), dense or input-sparse.

The kernels compute y = sum_g d_g (c_g . x_g) + m_g sum(x_g) per output, with a symmetric grid's offset
m = -d 2^(bits-1). An AWQ input scale s divides the input (x / s); under a sparsity rule the kernel decides the
mask on x itself (as the float32 kernels do, so that a top-k boundary cannot flip) and divides the kept values.
Without a C++ compiler, a projection falls back
to the float32 kernels on the dequantized weights (the same values, none of the savings).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from actlab import native
from actlab.engine.linear import EngineLinear
from actlab.models.adapter import LinearView
from actlab.transforms.quant.recipe import effective_weight, entry_quantized
from actlab.transforms.sparsity.recipe import MaskRule


def offsets(q: Any) -> torch.Tensor:
    """m per group: the asymmetric grid's offset, or -d 2^(bits-1) for a symmetric one."""
    return q.offset.float() if q.offset is not None else -q.scale.float() * (q.grid.levels // 2)


def sparse_codes(codes: torch.Tensor, four_bit: bool) -> torch.Tensor:
    """[out, in] codes transposed to [in, out] for the input-sparse kernel: 4-bit, byte j of a row = output j (low
    nibble) and output out/2 + j (high)."""
    t = codes.t().contiguous()
    if not four_bit:
        return t
    half = t.shape[1] // 2
    return (t[:, :half] | (t[:, half:] << 4)).contiguous()


def quant_kernels():
    return native.load("quant_gemv")


class QuantLinear(EngineLinear):
    """A projection on its codes (transposed, one kernel for dense and input-sparse products)."""

    def __init__(self, view: LinearView, rule: MaskRule | None, kernels, quant: dict[str, Any], qkernels,
                 bias_extra: list[float] | None = None):
        q = entry_quantized(quant)
        self.qkernels = qkernels
        self.grid = q.grid
        self.group = q.grid.group_size(q.codes.shape[1])
        self.four_bit = q.grid.bits <= 4 and q.codes.shape[0] % 2 == 0  # two outputs a byte
        s = quant.get("input_scale")
        self.inv_s = None if s is None else (1.0 / s.float()).contiguous()
        super().__init__(DequantizedView(view, effective_weight(quant)), rule, kernels, bias_extra)
        self.native = qkernels is not None
        if not self.native:
            return  # EngineLinear's float32 layout of the dequantized weights
        for layout in ("w", "wt"):  # the float32 layout is not needed
            self.__dict__.pop(layout, None)
        self.codes_t = sparse_codes(q.codes, self.four_bit)
        self.d_t, self.m_t = q.scale.half().t().contiguous(), offsets(q).half().t().contiguous()
        self.value_scale = self.inv_s if self.inv_s is not None else torch.empty(0)
        self.no_scale = torch.empty(0)

    def bytes_read(self, kept_fraction: float = 1.0) -> float:
        if not self.native:
            return super().bytes_read(kept_fraction)
        per_weight = 0.5 if self.four_bit else 1.0
        groups = self.in_features // self.group
        return self.in_features * self.out_features * per_weight * kept_fraction + 2 * 2 * groups * self.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.native:
            return super().__call__(x)
        if self.rule is None:  # a negative threshold keeps every channel
            y, _ = self.qkernels.q_sparse_gemv(self.codes_t, self.d_t, self.m_t, x, self.no_scale, -1.0,
                                               self.value_scale, self.group, self.four_bit)
        else:  # the mask decided on x as the float32 kernels decide it, the kept values divided by s
            cutoff = self.fixed_cutoff if self.fixed_cutoff is not None else self.cutoff(x)
            y, kept = self.qkernels.q_sparse_gemv(self.codes_t, self.d_t, self.m_t, x, self.scale, cutoff,
                                                  self.value_scale, self.group, self.four_bit)
            self.kept += kept
            self.seen += self.in_features
        return y if self.bias is None else y + self.bias


class DequantizedView:
    """A LinearView whose weight is the recipe's dequantized one (what EngineLinear lays out as a fallback)."""

    def __init__(self, view: LinearView, weight: torch.Tensor):
        self.view, self._weight = view, weight

    def weight(self) -> torch.Tensor:
        return self._weight

    def bias(self):
        return self.view.bias()


def warn_without_kernels() -> None:
    warnings.warn("actlab: the quantized kernels could not be built; quantized projections run on float32 "
                  "copies of their dequantized weights (same tokens, no speed-up)", RuntimeWarning, stacklevel=2)
