"""Model identity: what a model is, taken once when it is loaded, and compared wherever a result of one model
could be applied to another (recipes, calibration caches, resumed and merged runs).

Two models are the same when their configs agree on everything that changes the computation and every
weight agrees bit for bit. The name a user typed, a relative path or a working directory never counts: two
runs of "models/x" from different directories are different models if their weights differ, and one model
reached by two names is one model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import torch

from actlab.errors import ConfigError

# config fields that describe how a model was stored or is being run, not what it computes
_CONFIG_NOISE = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures", "_commit_hash",
                 "use_cache", "output_attentions", "output_hidden_states", "return_dict", "_attn_implementation",
                 "_attn_implementation_autoset", "_attn_implementation_internal", "_experts_implementation"}


@dataclass(frozen=True)
class ModelIdentity:
    name: str  # as the user gave it (informational only)
    source: str  # builtin | local-directory | huggingface-hub | gguf-file | wrapped | ...
    location: str  # resolved path, hub id or built-in name (informational only)
    model_type: str
    layers: int
    hidden_size: int
    config_sha256: str
    weights_sha256: str
    tokenizer_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelIdentity:
        fields = {k: d.get(k) for k in cls.__dataclass_fields__}
        missing = [k for k in ("model_type", "config_sha256", "weights_sha256") if not fields.get(k)]
        if missing:
            raise ConfigError(f"model identity lacks {', '.join(missing)}")
        return cls(**fields)

    def short(self) -> str:
        return (f"{self.name} ({self.model_type}, {self.layers} layers, hidden {self.hidden_size}, "
                f"weights {self.weights_sha256[:12]})")

    def differences(self, other: ModelIdentity) -> list[str]:
        """What makes `other` a different model (empty: the same model)."""
        out = []
        if self.model_type != other.model_type:
            out.append(f"architecture {self.model_type} vs {other.model_type}")
        if self.config_sha256 != other.config_sha256:
            out.append("config")
        if self.weights_sha256 != other.weights_sha256:
            out.append("weights")
        return out


def config_digest(config: Any) -> str:
    """sha256 of a config's computation-relevant fields (canonical JSON)."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    clean = {k: v for k, v in raw.items() if k not in _CONFIG_NOISE}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and persistent buffer: name, dtype, shape and bytes, in name order."""
    from actlab.models.placement import real_tensor

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = real_tensor(model, name, tensor.detach())  # an offloaded weight is read in: the same digest
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.device.type == "meta":  # never materialised (no weights anywhere): only its description counts
            h.update(b"meta")
            continue
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str | None:
    try:
        vocab = sorted(tokenizer.get_vocab().items())
    except Exception:  # a tokenizer without a vocabulary view: nothing to compare
        return None
    special = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    payload = json.dumps([type(tokenizer).__name__, vocab, special], default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def identify(model: torch.nn.Module, tokenizer: Any, name: str, source: str, location: str) -> ModelIdentity:
    cfg = model.config
    return ModelIdentity(name=name, source=source, location=location, model_type=cfg.model_type,
                         layers=int(getattr(cfg, "num_hidden_layers", 0) or 0),
                         hidden_size=int(getattr(cfg, "hidden_size", 0) or 0), config_sha256=config_digest(cfg),
                         weights_sha256=weights_digest(model), tokenizer_sha256=tokenizer_digest(tokenizer))


def require_same_model(recorded: dict[str, Any] | ModelIdentity, actual: ModelIdentity, what: str) -> None:
    """Raise a one-line ConfigError when `what` (e.g. "this recipe was calibrated") was made for another model."""
    mine = recorded if isinstance(recorded, ModelIdentity) else ModelIdentity.from_dict(recorded)
    diff = mine.differences(actual)
    if diff:
        raise ConfigError(f"{what} for {mine.short()}, not for this model {actual.short()}: "
                          f"{', '.join(diff)} differ")
