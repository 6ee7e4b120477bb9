"""KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"): keys quantized per
channel over groups of `group` consecutive tokens (key outliers sit in fixed channels), values per token over
groups of `group` channels; asymmetric round-to-nearest between each group's minimum and maximum, the scale and
minimum held in float16. Tokens of a group that is not complete yet stay in full precision (KIVI's residual).
Plain functions on [..., tokens, head dim] tensors; session.py applies them to the cache as groups complete.
"""

from __future__ import annotations

import torch

from actlab.errors import ConfigError
from actlab.transforms.kv.method import OPTIONS, KVMethod


def _round_to_grid(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int) -> torch.Tensor:
    levels = (1 << bits) - 1
    low, scale = low.half().float(), ((high - low) / levels).half().float()  # stored as float16
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round((x - low) / scale), 0, levels)
    return codes * scale + low


def quantize_keys(keys: torch.Tensor, bits: int) -> torch.Tensor:
    """Keys [..., G, D] of one token group: each channel over the group's tokens."""
    x = keys.float()
    return _round_to_grid(x, x.amin(-2, keepdim=True), x.amax(-2, keepdim=True), bits).to(keys.dtype)


def value_group(head_dim: int, group: int) -> int:
    g = min(group, head_dim)
    if head_dim % g:
        raise ConfigError(f"kv quantization: a value group of {g} channels does not divide the head size {head_dim}")
    return g


def quantize_values(values: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Values [..., T, D]: each token over groups of `group` channels."""
    g = value_group(values.shape[-1], group)
    x = values.float().unflatten(-1, (-1, g))
    return _round_to_grid(x, x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), bits).flatten(-2).to(values.dtype)



class KIVI(KVMethod):
    """Quantization of the cache alone (every token kept); `--bits` adds it to any other method."""

    name = "kivi"
    paper = "Liu et al. 2024 (arXiv:2402.02750)"
    press = "streaming-llm"
    budgets = "every token kept, quantized"

    def __init__(self, **options):
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise TypeError(f"unexpected parameter {sorted(unknown)[0]!r}")
        options.setdefault("bits", 4)
        super().__init__(**options)
        if not self.options["bits"]:
            raise ConfigError("kivi quantizes the cache: give --bits 8, 4 or 2")

    def calibrate(self, calib, target):
        if target:
            raise ConfigError("kivi keeps every token (--ratio 0); to evict as well, give --bits to an eviction "
                              "method (e.g. --method snapkv --ratio 0.5 --bits 4)")
        return self.recipe(calib.lm, 0.0)
