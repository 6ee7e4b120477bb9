"""The one vocabulary of names for places in a model, shared by probes, recipes, tables and the engine.

    layer key        "L3"                  a decoder layer
    projection key   "L3.q"                a projection of layer 3, by canonical role (see architectures.py)
    site name        "L3.resid_out"        a place where an activation can be read or edited (probe.sites)
    projection site  "L3.q_in", "L3.q_out" the input / output of a projection

Nothing else in actlab formats or parses these strings.
"""

from __future__ import annotations

from actlab.errors import ConfigError

LAYER_PREFIX = "L"
ATTN_ROLES = ("q", "k", "v", "qkv", "o")
MLP_ROLES = ("gate", "up", "down")
ROLES = ATTN_ROLES + MLP_ROLES


def layer_key(layer: int) -> str:
    return f"{LAYER_PREFIX}{layer}"


def site_key(layer: int, kind: str) -> str:
    return f"{LAYER_PREFIX}{layer}.{kind}"


def projection_key(layer: int, role: str) -> str:
    return f"{LAYER_PREFIX}{layer}.{role}"


def projection_site(key: str, side: str = "in") -> str:
    """The site at the input ("in") or output ("out") of the projection `key` names: "L3.q" -> "L3.q_in"."""
    if side not in ("in", "out"):
        raise ValueError(f"side must be 'in' or 'out', got {side!r}")
    return f"{key}_{side}"


def layer_of(key: str) -> int | None:
    """The layer a key names ("L3", "L3.q", "L3.resid_out" -> 3), or None for a global one ("logits")."""
    head = key.split(".", 1)[0]
    if head.startswith(LAYER_PREFIX) and head[len(LAYER_PREFIX):].isdigit():
        return int(head[len(LAYER_PREFIX):])
    return None


def kind_of(key: str) -> str:
    """What a key names within its layer ("L3.q" -> "q", "L3.resid_out" -> "resid_out"); a global key itself."""
    return key.split(".", 1)[1] if "." in key else key


def split_key(key: str) -> tuple[int, str]:
    """"L3.down" -> (3, "down"): the layer index and role (or site kind) a layer-level key names."""
    layer = layer_of(key)
    if layer is None or "." not in key:
        raise ConfigError(f"{key!r} is not a layer-level key of the form L<layer>.<name>")
    return layer, kind_of(key)


_ATTENTION_SITES = {"attn_in", "v", "attn_probs", "o_in"}
_MLP_SITES = {"mlp_in", "gate", "act", "up", "down_in", "router", "routing", "moe_out"}


def sublayer_of(kind: str) -> str | None:
    """"attn" or "mlp" for a projection role or a site kind inside that sublayer ("q", "q_in", "act", ...);
    None for the residual stream and the sublayer-spanning sites."""
    role = kind.rsplit("_", 1)[0] if kind.endswith(("_in", "_out")) and kind not in _ATTENTION_SITES | _MLP_SITES \
        else kind
    if role in ATTN_ROLES or kind in _ATTENTION_SITES or kind == "attn":
        return "attn"
    if role in MLP_ROLES or kind in _MLP_SITES or kind == "mlp":
        return "mlp"
    return None
