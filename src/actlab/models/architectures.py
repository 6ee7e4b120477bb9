"""Declarative map from each supported Hugging Face architecture to canonical transformer parts.

Adding an architecture is one `ArchSpec` entry: module paths (relative to the model for global
parts, relative to one decoder layer for per-layer parts). Nothing else in actlab matches on module
names. Canonical roles:

- attention: `q`, `k`, `v` (or one fused `qkv` whose output rows are [q; k; v], or, with `qkv_layout="heads"`,
  [q_h; k_h; v_h] head after head as GPT-NeoX stores them), `o`;
- MLP: `gate` is the projection whose output goes through the activation function, `up` the one
  multiplied element-wise with it (gated MLPs only), `down` the output projection. A non-gated MLP
  (GPT-2, OPT: fc1 -> act -> fc2) has `gate` = fc1, no `up`, `down` = fc2. A fused `gate_up` module
  (Phi-3) has output rows [gate; up]; the adapter splits it into `gate` and `up` views of the same module;
- norms: `attn_norm` (before attention), `mlp_norm` (before the MLP; its input is the residual stream
  after attention), optional norms applied to the sublayer outputs (Gemma 2/3 have both, OLMo-2 only these),
  optional q/k norms per head (Qwen3, Gemma 3) or over the whole projection (OLMo-2);
- mixture of experts (Mixtral, Qwen3-MoE): `router` returns (logits, top-k weights, top-k indices) and
  `experts` holds every expert's weights as 3-D tensors (transformers 5: gate_up_proj [E, 2I, H] with rows
  [gate; up] per expert, down_proj [E, H, I]). A layer whose MLP has no `experts` module is a dense layer of
  the same family (Qwen3-MoE's `mlp_only_layers`), read through `gate` / `up` / `down`;
- residual: sequential (attention, then the MLP on the updated stream) or, where the config's
  `parallel_residual_attr` is true, parallel (GPT-NeoX: x + attn(norm1(x)) + mlp(norm2(x))).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    # global parts, relative to the *ForCausalLM model
    layers: str
    embed: str
    final_norm: str
    lm_head: str
    # per-layer parts, relative to one decoder layer
    attn: str
    o: str
    gate: str | None  # None with a fused gate_up, or in a family whose every layer is a mixture of experts
    down: str | None
    act: str
    attn_norm: str | None = None  # None: the sublayer reads the residual stream itself (OLMo-2)
    mlp_norm: str | None = None
    mlp: str | None = None  # the MLP module (where its input is read when there is no pre-MLP norm)
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    up: str | None = None
    gate_up: str | None = None  # one module whose output rows are [gate; up] (Phi-3)
    router: str | None = None  # mixture of experts (see above)
    experts: str | None = None
    # config fields that place the dense layers of a partly-MoE family: a list of layer indices and a period
    # (Qwen-MoE: layer i has experts unless i is in mlp_only_layers, and only where (i + 1) % step == 0)
    dense_layers_attr: str | None = None
    sparse_step_attr: str | None = None
    qkv_layout: str = "blocks"  # "blocks": [q; k; v]; "heads": [q_h; k_h; v_h] per head (GPT-NeoX)
    parallel_residual_attr: str | None = None  # config attribute that turns on the parallel residual
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    q_norm: str | None = None
    k_norm: str | None = None
    qk_norm_per_head: bool = True  # False: q_norm / k_norm normalise the whole projection (OLMo-2)
    # weights stored as [in, out] (GPT-2's Conv1D) instead of nn.Linear's [out, in]
    transposed_weights: bool = False
    # positions: a rotary module (called per layer type) or a learned position table added to the embedding
    rotary: str | None = None
    pos_embed: str | None = None
    pos_offset: int = 0  # OPT's learned positions start at row 2
    q_prescaled: bool = False  # OPT multiplies q by the attention scale right after q_proj
    sliding_window_from_config: bool = False  # Mistral: config.sliding_window applies to every layer
    # returns a reason when a config of this family is a variant we do not support
    unsupported_variant: Callable[[Any], str | None] | None = None

    @property
    def gated_mlp(self) -> bool:
        return self.up is not None or self.gate_up is not None or self.experts is not None


_LLAMA_LIKE = dict(
    mlp="mlp",
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    attn="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
    act="mlp.act_fn",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    rotary="model.rotary_emb",
)


def _opt_variant(config: Any) -> str | None:
    if not getattr(config, "do_layer_norm_before", True):
        return "post-LayerNorm OPT (do_layer_norm_before=False, e.g. opt-350m) is not supported"
    if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
        return "OPT with project_in/project_out (word_embed_proj_dim != hidden_size) is not supported"
    return None


ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(family="llama", model_types=("llama", "qwen2"), **_LLAMA_LIKE),
    ArchSpec(family="mistral", model_types=("mistral",), sliding_window_from_config=True, **_LLAMA_LIKE),
    ArchSpec(family="qwen3", model_types=("qwen3",), q_norm="self_attn.q_norm", k_norm="self_attn.k_norm",
             **_LLAMA_LIKE),
    ArchSpec(family="mixtral", model_types=("mixtral",), sliding_window_from_config=True,
             **{**_LLAMA_LIKE, "gate": None, "up": None, "down": None, "act": "mlp.experts.act_fn"},
             router="mlp.gate", experts="mlp.experts"),
    ArchSpec(family="qwen3_moe", model_types=("qwen3_moe",), q_norm="self_attn.q_norm", k_norm="self_attn.k_norm",
             **{**_LLAMA_LIKE, "act": "mlp.act_fn"}, router="mlp.gate", experts="mlp.experts",
             dense_layers_attr="mlp_only_layers", sparse_step_attr="decoder_sparse_step"),
    ArchSpec(
        family="gemma3",
        model_types=("gemma3_text",),
        **{**_LLAMA_LIKE, "mlp_norm": "pre_feedforward_layernorm"},
        attn_post_norm="post_attention_layernorm",
        mlp_post_norm="post_feedforward_layernorm",
        q_norm="self_attn.q_norm",
        k_norm="self_attn.k_norm",
    ),
    ArchSpec(
        family="gemma2",
        model_types=("gemma2",),
        **{**_LLAMA_LIKE, "mlp_norm": "pre_feedforward_layernorm"},
        attn_post_norm="post_attention_layernorm",
        mlp_post_norm="post_feedforward_layernorm",
    ),
    ArchSpec(
        family="olmo2",
        model_types=("olmo2",),
        **{**_LLAMA_LIKE, "attn_norm": None, "mlp_norm": None},
        attn_post_norm="post_attention_layernorm",
        mlp_post_norm="post_feedforward_layernorm",
        q_norm="self_attn.q_norm",
        k_norm="self_attn.k_norm",
        qk_norm_per_head=False,
    ),
    ArchSpec(
        family="phi3",
        model_types=("phi3",),
        **{**_LLAMA_LIKE, "q": None, "k": None, "v": None, "gate": None, "up": None, "act": "mlp.activation_fn"},
        qkv="self_attn.qkv_proj",
        gate_up="mlp.gate_up_proj",
        sliding_window_from_config=True,
    ),
    ArchSpec(
        family="gpt_neox",
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
        attn="attention",
        qkv="attention.query_key_value",
        qkv_layout="heads",
        o="attention.dense",
        mlp="mlp",
        gate="mlp.dense_h_to_4h",
        down="mlp.dense_4h_to_h",
        act="mlp.act",
        attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        rotary="gpt_neox.rotary_emb",
        parallel_residual_attr="use_parallel_residual",
    ),
    ArchSpec(
        family="gpt2",
        model_types=("gpt2",),
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        attn="attn",
        qkv="attn.c_attn",
        o="attn.c_proj",
        gate="mlp.c_fc",
        down="mlp.c_proj",
        act="mlp.act",
        mlp="mlp",
        attn_norm="ln_1",
        mlp_norm="ln_2",
        transposed_weights=True,
        pos_embed="transformer.wpe",
    ),
    ArchSpec(
        family="opt",
        model_types=("opt",),
        layers="model.decoder.layers",
        embed="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm",
        lm_head="lm_head",
        attn="self_attn",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.out_proj",
        gate="fc1",
        down="fc2",
        act="activation_fn",
        attn_norm="self_attn_layer_norm",
        mlp_norm="final_layer_norm",
        pos_embed="model.decoder.embed_positions",
        pos_offset=2,
        q_prescaled=True,
        unsupported_variant=_opt_variant,
    ),
)


def supported_model_types() -> list[str]:
    return sorted(t for spec in ARCHITECTURES for t in spec.model_types)


def spec_for_model_type(model_type: str) -> ArchSpec | None:
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    return None
