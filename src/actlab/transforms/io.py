"""Recipe files: a short JSON or YAML header a person can read, tensors in a safetensors sidecar.

    recipe.json (or .yaml)        {"format": 2, "family": ..., "method": ..., "model": {...}, ...,
                                   "tensors": {"file": "recipe.json.safetensors", "sha256": ...}}
    recipe.json.safetensors       every tensor and every long list of numbers of the recipe

In the header a tensor is {"$tensor": name}; loading puts it back (lists come back as lists, exactly: float
values that float32 cannot hold are stored as float64). A composition is one file whose header holds a list
of recipes. Both files are written atomically, the sidecar first, and the header records the sidecar's
sha256, so a header never points at a torn or foreign sidecar.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from actlab.errors import ConfigError
from actlab.fsutil import atomic_path, atomic_write_text
from actlab.transforms.base import RECIPE_FORMAT, Recipe, recipe_type

INLINE_MAX = 16  # lists of numbers up to this length stay in the header
TENSOR = "$tensor"


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".safetensors")


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write `recipe` (one recipe or a composition) to `path` (.json, .yaml or .yml) and its sidecar."""
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    tensors: dict[str, torch.Tensor] = {}
    header = {"format": RECIPE_FORMAT, **_extract(recipe.header(), "", tensors)}
    side = sidecar_path(path)
    if tensors:
        with atomic_path(side) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        header["tensors"] = {"file": side.name, "sha256": _sha256(side)}
    else:
        side.unlink(missing_ok=True)
    atomic_write_text(path, _dump(header, path))
    return path


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file (any family, or a composition); one-line errors for anything malformed."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc.strerror or exc}") from exc
    try:
        data = _parse(text, path)
    except ValueError as exc:  # json.JSONDecodeError, yaml.YAMLError are ValueErrors or wrapped below
        raise ConfigError(f"recipe {path} is not valid {'YAML' if _is_yaml(path) else 'JSON'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: expected a mapping at the top, got {type(data).__name__}")
    fmt = data.pop("format", None)
    if fmt == 1:  # the sparsity-only format of round 1: inline lists, no family field
        return recipe_type("sparsity").from_dict({"format": 1, **data})
    if fmt != RECIPE_FORMAT:
        raise ConfigError(f"recipe {path}: not an actlab recipe (format {fmt!r}; this actlab reads 1 and "
                          f"{RECIPE_FORMAT})")
    tensors = _read_sidecar(path, data.pop("tensors", None))
    try:
        return recipe_from_header(_restore(data, tensors))
    except ConfigError as exc:
        raise ConfigError(f"recipe {path}: {exc}") from exc


def recipe_from_header(data: dict[str, Any]) -> Recipe:
    data = dict(data)
    family = data.pop("family", None)
    cls = recipe_type(family)
    version = data.pop("version", 1)
    if not isinstance(version, int) or version > cls.version:
        raise ConfigError(f"{family} recipe version {version!r} is newer than this actlab's ({cls.version})")
    return cls.from_dict(data)


# -- tensors out of and back into the header -------------------------------------------------------

def _extract(obj: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    if torch.is_tensor(obj):
        tensors[where] = obj.detach().cpu()
        return {TENSOR: where}
    if isinstance(obj, dict):
        return {k: _extract(v, f"{where}/{k}" if where else str(k), tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if len(obj) > INLINE_MAX and _numbers(obj):
            tensors[where] = _exact_tensor(obj)
            return {TENSOR: where, "list": True}
        return [_extract(v, f"{where}/{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _restore(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if TENSOR in obj:
            name = obj[TENSOR]
            if name not in tensors:
                raise ConfigError(f"the sidecar holds no tensor {name!r}")
            return tensors[name].tolist() if obj.get("list") else tensors[name]
        return {k: _restore(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore(v, tensors) for v in obj]
    return obj


def _numbers(values: list | tuple) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _exact_tensor(values: list | tuple) -> torch.Tensor:
    if all(isinstance(v, int) for v in values):
        return torch.tensor(values, dtype=torch.int64)
    wide = torch.tensor(values, dtype=torch.float64)
    narrow = wide.float()
    return narrow if torch.equal(narrow.double(), wide) or bool(torch.isnan(wide).any()) else wide


def _read_sidecar(path: Path, info: Any) -> dict[str, torch.Tensor]:
    if info is None:
        return {}
    from safetensors.torch import load_file

    if not isinstance(info, dict) or not isinstance(info.get("file"), str):
        raise ConfigError(f"recipe {path}: malformed 'tensors' field")
    side = path.with_name(info["file"])
    if not side.is_file():
        raise ConfigError(f"recipe {path}: its tensor file {side.name} is missing (copy it along with the recipe)")
    if info.get("sha256") != _sha256(side):
        raise ConfigError(f"recipe {path}: {side.name} does not match the recipe (sha256 differs); it belongs to "
                          "another save of the recipe or is corrupt")
    try:
        return load_file(str(side))
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise ConfigError(f"recipe {path}: cannot read {side.name} ({type(exc).__name__}: {exc})") from exc


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_yaml(path: Path) -> bool:
    return path.suffix.lower() in (".yaml", ".yml")


def _dump(header: dict[str, Any], path: Path) -> str:
    if _is_yaml(path):
        import yaml

        return yaml.safe_dump(header, sort_keys=False)
    return json.dumps(header, indent=1) + "\n"


def _parse(text: str, path: Path) -> Any:
    if _is_yaml(path):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(str(exc).replace("\n", " ")) from exc
    return json.loads(text)
