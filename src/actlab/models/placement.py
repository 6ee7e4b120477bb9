"""Where a model's weights live: in memory (the default), or spread by accelerate over GPUs, CPU and disk.

`--device-map auto --max-memory cpu=2GiB` (the command line's global options, passed on to every command
through ACTLAB_DEVICE_MAP / ACTLAB_MAX_MEMORY) loads a model bigger than memory: transformers places each
module with accelerate, modules that do not fit stay on disk and are read in for their forward pass (their
parameters are `meta` tensors between passes). Hooks and edits see the same activations as in memory; code
that reads a weight directly does so inside `materialized(module)`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from actlab.errors import ConfigError

DEVICE_MAP_ENV = "ACTLAB_DEVICE_MAP"
MAX_MEMORY_ENV = "ACTLAB_MAX_MEMORY"
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$", re.IGNORECASE)


def parse_max_memory(text: str) -> dict[Any, str]:
    """`cpu=2GiB,0=20GiB` -> {"cpu": "2GiB", 0: "20GiB"} (accelerate's max_memory; "disk" is always there)."""
    out: dict[Any, str] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        device, sep, size = part.partition("=")
        device, size = device.strip(), size.strip()
        if not sep or not _SIZE.match(size) or not (device in ("cpu", "mps") or device.isdigit()):
            raise ConfigError(f"--max-memory {text!r}: each entry is DEVICE=SIZE with DEVICE cpu or a GPU index "
                              "and SIZE such as 500MB or 2GiB, e.g. cpu=2GiB,0=20GiB")
        out[int(device) if device.isdigit() else device] = size
    if not out:
        raise ConfigError("--max-memory names no device")
    return out


@dataclass(frozen=True)
class Placement:
    device_map: str | None = None
    max_memory: str | None = None

    def __post_init__(self) -> None:
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise ConfigError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, got {self.device_map!r}")
        if self.max_memory is not None:
            parse_max_memory(self.max_memory)

    @classmethod
    def from_environment(cls) -> Placement:
        return cls(os.environ.get(DEVICE_MAP_ENV) or None, os.environ.get(MAX_MEMORY_ENV) or None)

    @property
    def spread(self) -> bool:
        return self.device_map is not None or self.max_memory is not None

    def export(self) -> None:
        """Hand this placement to every model the command loads (and to the processes it launches)."""
        for name, value in ((DEVICE_MAP_ENV, self.device_map), (MAX_MEMORY_ENV, self.max_memory)):
            if value is not None:
                os.environ[name] = value

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        if not self.spread:
            return {}
        kwargs: dict[str, Any] = {"device_map": self.device_map or "auto", "offload_folder": _offload_folder()}
        if self.max_memory is not None:
            kwargs["max_memory"] = parse_max_memory(self.max_memory)
        return kwargs

    def describe(self) -> dict[str, Any]:
        return {"device_map": self.device_map or "auto", "max_memory": self.max_memory} if self.spread else {}


def _offload_folder() -> str:
    """A folder for weights accelerate writes out, removed when the process ends."""
    from actlab.models.cache import cache_root

    root = cache_root() / "offload"
    root.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root)
    atexit.register(shutil.rmtree, folder, True)
    return folder


def is_offloaded(module: torch.nn.Module) -> bool:
    """Some of the module's weights live off the execution device between forward passes (meta tensors)."""
    return any(p.device.type == "meta" for p in module.parameters())


def execution_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: the embedding's execution device under accelerate, else its first weight's."""
    embed = model.get_input_embeddings()
    hook = getattr(embed, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return next(model.parameters()).device


@contextlib.contextmanager
def materialized(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The module with its own weights real (read in from where accelerate keeps them) inside the block; a
    module in memory as it is."""
    if not any(p.device.type == "meta" for p in module.parameters(recurse=False)):
        yield module
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield module


def real_tensor(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """State-dict entry `name` with its values (a CPU copy when it was offloaded)."""
    if tensor.device.type != "meta":
        return tensor
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    with materialized(module):
        value = getattr(module, attr).detach()
        return value if value.device.type == "meta" else value.cpu().clone()
