"""The quantization grid every method shares: integer codes in groups along the input dimension.

A weight matrix W [out, in] is cut into groups of `group` consecutive input channels per output row (group 0:
one group per row, "per channel"); each group has a scale d (and, asymmetric, an offset m) and each weight a
code c in [0, 2^bits - 1]:

    asymmetric  w ~ d * c + m          d = (max - min) / (2^bits - 1), m = min           (GGUF's Q4_1)
    symmetric   w ~ d * (c - 2^(bits-1))   d = v / -2^(bits-1), v the group's value of largest magnitude
                                                                                          (GGUF's Q4_0)

Both represent the group's extreme values (up to the float16 rounding of d and m, which are stored as float16 like
GGUF's) and use every level; the symmetric scale may be negative (so that the largest magnitude, of either sign,
sits on the lowest code). Groups lie along the input
dimension so that a skipped input channel (activation sparsity) skips its codes and its group's scale.

`clip` (in (0, 1]) shrinks a group's range before fitting: AWQ's and GPTQ's clipping search chooses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actlab.errors import ConfigError

MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class Grid:
    bits: int
    group: int = 64  # input channels per scale; 0: one scale per output row
    symmetric: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {self.bits!r}")
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 0:
            raise ConfigError(f"group must be a positive number of input channels (0: per channel), got {self.group!r}")

    @property
    def levels(self) -> int:
        return 2 ** self.bits

    def group_size(self, in_features: int, where: str = "") -> int:
        """The input channels per group for a matrix with `in_features` columns (a clear error if they do not
        divide)."""
        if self.group == 0:
            return in_features
        if in_features % self.group:
            fits = [d for d in (16, 32, 64, 96, 128, 192, 256) if in_features % d == 0]
            raise ConfigError(f"group {self.group} does not divide the {in_features} input channels"
                              f"{f' of {where}' if where else ''}; groups that do: "
                              f"{', '.join(map(str, fits)) or 'none of 16-256'} (or 0: one per output channel)")
        return self.group

    def bits_per_weight(self, in_features: int) -> float:
        """Code bits plus the group's float16 scale (and offset), per weight: what the recipe and GGUF store."""
        return self.bits + 16 * (1 if self.symmetric else 2) / self.group_size(in_features)

    def describe(self) -> str:
        return f"{self.bits}-bit {'sym' if self.symmetric else 'asym'} g{self.group or 'channel'}"


@dataclass
class Quantized:
    """W's codes on a grid: codes uint8 [out, in], scale and offset [out, groups] (offset None: symmetric)."""

    grid: Grid
    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None

    def dequantize(self) -> torch.Tensor:
        return decode(self.codes, self.grid, self.scale, self.offset)


def _grouped(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    out, cols = w.shape
    g = grid.group_size(cols)
    return w.reshape(out, cols // g, g)


def fit(w: torch.Tensor, grid: Grid, clip: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, offset) [out, groups] of W's groups; `clip` (a number, or one per group) shrinks each range."""
    groups = _grouped(w.float(), grid)
    if grid.symmetric:
        idx = groups.abs().argmax(dim=-1, keepdim=True)
        extreme = groups.gather(-1, idx).squeeze(-1) * clip
        return half(extreme / -(grid.levels // 2)), None
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    lo, hi = lo * clip, hi * clip  # shrunk toward zero, as the symmetric range is
    return half((hi - lo) / (grid.levels - 1)), half(lo)


def half(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to float16 values (kept in float32): scales are stored as float16, as GGUF stores them."""
    return t.half().float()


def encode(w: torch.Tensor, grid: Grid, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """Codes uint8 [out, in] of W for the given group scales (rounded to nearest, clamped to the grid)."""
    groups = _grouped(w.float(), grid)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)[..., None]
    if offset is None:
        q = torch.round(groups / safe) + grid.levels // 2
    else:
        q = torch.round((groups - offset[..., None]) / safe)
    return q.clamp_(0, grid.levels - 1).to(torch.uint8).reshape(w.shape)


def decode(codes: torch.Tensor, grid: Grid, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """The float32 weights [out, in] that codes and scales stand for."""
    groups = _grouped(codes.float(), grid)
    if offset is None:
        values = (groups - grid.levels // 2) * scale[..., None]
    else:
        values = groups * scale[..., None] + offset[..., None]
    return values.reshape(codes.shape)


def quantize(w: torch.Tensor, grid: Grid, clip: float | torch.Tensor = 1.0) -> Quantized:
    """Round-to-nearest onto `grid` (scales fitted to each group's range, shrunk by `clip`)."""
    scale, offset = fit(w, grid, clip)
    return Quantized(grid, encode(w, grid, scale, offset), scale, offset)


def fake_quantize(w: torch.Tensor, grid: Grid, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    return quantize(w, grid, clip).dequantize()


# -- storage -------------------------------------------------------------------------------------------------
def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of up to 4 bits two to a byte (low nibble first, along the input dimension); wider ones as they are."""
    if bits > 4:
        return codes.contiguous()
    if codes.shape[-1] % 2:
        raise ConfigError("4-bit packing needs an even number of input channels")
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits > 4:
        return packed
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)


# -- activations (W8A8) ---------------------------------------------------------------------------------------
def fake_quantize_tokens(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic symmetric per-token quantization of activations (each token's absmax onto 2^(bits-1) - 1)."""
    top = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).float() / top
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.round(x.float() / scale).clamp_(-top, top) * scale).to(x.dtype)
