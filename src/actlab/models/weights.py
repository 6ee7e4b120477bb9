"""Temporary weight swaps with exact restore: the transforms that change weights (quantization, repairs) put
their tensors in place for the duration of a context and hand the original tensor objects back afterwards, so
a model leaves every context bit-identical (and any other reference to the old tensor stays valid)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def swapped(module: nn.Module, name: str, value: torch.Tensor) -> Iterator[None]:
    """`module.<name>` (a parameter or a buffer) is `value` inside the block, its original object after it."""
    if name in module._parameters:
        original, store = module._parameters[name], module._parameters
        new = nn.Parameter(value.to(original.dtype), requires_grad=original.requires_grad)
    elif name in module._buffers:
        original, store = module._buffers[name], module._buffers
        new = value.to(original.dtype)
    else:
        raise KeyError(f"{type(module).__name__} has no parameter or buffer {name!r}")
    if tuple(new.shape) != tuple(original.shape):
        raise ValueError(f"{name}: the replacement has shape {tuple(new.shape)}, the original {tuple(original.shape)}")
    store[name] = new
    try:
        yield
    finally:
        store[name] = original
