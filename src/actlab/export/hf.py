"""Export to a Hugging Face directory that plain `AutoModelForCausalLM.from_pretrained` loads.

Each recipe of the composition says how it exports (`Recipe.export_hf`): "weights" recipes are folded into a
copy of the model (removed layers are taken out, the config cut to match), so plain transformers computes the
transform; "runtime" recipes (activation sparsity, interventions) cannot be expressed in weights and config,
so the weights are saved without them and the recipe is embedded beside them (`actlab-recipe.json` + sidecar):
`actlab.load_model(dir)` re-attaches it, plain transformers runs the model untransformed. `actlab-export.json`
records the source model's identity, what was folded and what was embedded.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from actlab.errors import ConfigError
from actlab.fsutil import atomic_directory, atomic_write_json
from actlab.transforms.compose import compose

RECIPE_FILE = "actlab-recipe.json"
MANIFEST_FILE = "actlab-export.json"


def plan_export(lm: Any, recipe: Any | None) -> tuple[list[Any], list[Any]]:
    """(folded, embedded) members of `recipe`, in order; refuses what cannot be exported."""
    from actlab.transforms.compose import members, validate

    if recipe is None:
        return [], []
    validate(recipe, lm)
    folded, embedded = [], []
    for part in members(recipe):
        mode = part.export_hf(lm)  # raises ConfigError where neither is possible
        (folded if mode == "weights" else embedded).append(part)
    if embedded and any(p.changes_structure(lm) for p in folded):
        raise ConfigError(f"{embedded[0].describe()} is a runtime transform keyed by this model's layers, and "
                          f"{next(p for p in folded if p.changes_structure(lm)).describe()} renumbers them: export "
                          "the runtime recipe on its own, or calibrate it on the exported model")
    return folded, embedded


def folded_model(lm: Any, folded: list[Any]) -> Any:
    """lm.model with the `folded` recipes folded in (a copy; lm.model itself when there is nothing to fold)."""
    if not folded:
        return lm.model
    model = copy.deepcopy(lm.model)
    for part in folded:
        model = part.fold_into(lm, model)
    return model


def export_hf(lm: Any, recipe: Any | None, out: str | Path) -> dict[str, Any]:
    out = Path(out).expanduser()
    if out.exists():
        raise ConfigError(f"{out} already exists; export into a new directory")
    folded, embedded = plan_export(lm, recipe)
    model = folded_model(lm, folded)
    notes = []
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp)
        exported_identity = None
        if embedded:
            exported_identity = _saved_identity(tmp, model, lm, out)
            runtime = compose([dataclasses.replace(p, model=exported_identity) for p in embedded])
            runtime.save(tmp / RECIPE_FILE)
            notes.append(f"embedded {runtime.describe()} (a runtime transform): actlab.load_model('{out}') re-attaches "
                         "it; plain transformers runs this directory without it")
        if folded:
            notes.append("folded into the weights: " + ", ".join(p.describe() for p in folded) +
                         " (plain transformers computes it)")
        if not recipe:
            notes.append("the dense model")
        atomic_write_json(tmp / MANIFEST_FILE, {
            "format": 1, "source": lm.identity.to_dict(), "folded": [p.describe() for p in folded],
            "embedded": [p.describe() for p in embedded], "embedded_for": exported_identity})
    return {"path": str(out), "format": "hf", "folded": [p.describe() for p in folded],
            "embedded": [p.describe() for p in embedded], "notes": notes}


def _saved_identity(tmp: Path, model: Any, lm: Any, out: Path) -> dict[str, Any]:
    """The identity `actlab.load_model(out)` will take: the saved config as it reads back, the weights as saved."""
    from transformers import AutoConfig

    from actlab.models.identity import ModelIdentity, config_digest, tokenizer_digest, weights_digest

    cfg = AutoConfig.from_pretrained(tmp)
    return ModelIdentity(name=str(out), source="local-directory", location=str(out.resolve()),
                         model_type=cfg.model_type, layers=int(getattr(cfg, "num_hidden_layers", 0) or 0),
                         hidden_size=int(getattr(cfg, "hidden_size", 0) or 0), config_sha256=config_digest(cfg),
                         weights_sha256=weights_digest(model),
                         tokenizer_sha256=tokenizer_digest(lm.tokenizer)).to_dict()


def embedded_recipe(directory: Path) -> Path | None:
    path = Path(directory) / RECIPE_FILE
    return path if path.is_file() else None
