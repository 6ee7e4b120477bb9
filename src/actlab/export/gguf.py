"""Export to GGUF (the `gguf` package), the file llama.cpp runs.

Each family says how its Hugging Face tensors become GGUF tensors (`GGUF_FAMILIES`): the GGUF architecture,
the name map (the `gguf` package's own, from HF module names), and the few value changes llama.cpp expects
- Llama/Mistral q and k rows back in the interleaved rotary order HF's conversion undid, Gemma's norms stored
as 1 + w, GPT-2's Conv1D weights transposed. The tokenizer is copied from the GGUF the model came from when
there is one (both built-in models), else built from a byte-level BPE `tokenizer.json`. Tensors are written
in float32 (or float16, or one of GGUF's block types: Q8_0, Q5_0, Q5_1, Q4_0, Q4_1); the matrices of a quant
recipe in the block type its grid maps to (`block_type_for`). Only what the weights compute can be exported: a
runtime recipe cannot.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actlab.errors import ConfigError
from actlab.fsutil import atomic_path


def _permute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half layout -> the interleaved pairs of the original Llama weights (what llama.cpp reads)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class GGUFFamily:
    arch: str  # gguf.MODEL_ARCH member name
    tensor: Callable[[str, torch.Tensor, Any], torch.Tensor]  # (hf name, tensor, config) -> tensor to write


def _llama_tensor(name: str, t: torch.Tensor, cfg: Any) -> torch.Tensor:
    if name.endswith("q_proj.weight"):
        return _permute_rotary(t, cfg.num_attention_heads)
    if name.endswith("k_proj.weight"):
        return _permute_rotary(t, cfg.num_key_value_heads)
    return t


def _gemma_tensor(name: str, t: torch.Tensor, cfg: Any) -> torch.Tensor:
    return t + 1.0 if name.endswith("norm.weight") else t


def _gpt2_tensor(name: str, t: torch.Tensor, cfg: Any) -> torch.Tensor:
    conv1d = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
    return t.t() if name.endswith(conv1d) else t


def _same(name: str, t: torch.Tensor, cfg: Any) -> torch.Tensor:
    return t


GGUF_FAMILIES: dict[str, GGUFFamily] = {
    "llama": GGUFFamily("LLAMA", _llama_tensor),
    "mistral": GGUFFamily("LLAMA", _llama_tensor),
    "qwen2": GGUFFamily("QWEN2", _same),
    "qwen3": GGUFFamily("QWEN3", _same),
    "gemma3_text": GGUFFamily("GEMMA3", _gemma_tensor),
    "gpt2": GGUFFamily("GPT2", _gpt2_tensor),
}


# GGUF's block types that the `gguf` package can write, by name; blocks of 32 weights along the input dimension
BLOCK_TYPES = ("q8_0", "q5_0", "q5_1", "q4_0", "q4_1")
DTYPES = ("f32", "f16", *BLOCK_TYPES)
BLOCK = 32


def block_type_for(grid: Any) -> str:
    """The GGUF type that holds a quant recipe's grid: the same bits and symmetry where GGUF has them (4-bit
    groups of 32: Q4_0 / Q4_1, exact up to their float16 scales), else the next wider type (2-3 bits: Q4, 6-8
    bits: Q8_0), into which the recipe's values are re-rounded."""
    if grid.bits <= 4:
        return "q4_0" if grid.symmetric else "q4_1"
    if grid.bits == 5:
        return "q5_0" if grid.symmetric else "q5_1"
    return "q8_0"


def _file_type(types: list[str], dtype: str) -> int:
    import gguf

    names = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q5_0": "MOSTLY_Q5_0",
             "q5_1": "MOSTLY_Q5_1", "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1"}
    common = max(set(types), key=types.count) if types else dtype
    return int(getattr(gguf.LlamaFileType, names[common]))


def export_gguf(lm: Any, recipe: Any | None, out: str | Path, dtype: str = "f32") -> dict[str, Any]:
    import gguf

    from actlab.export.hf import folded_model, plan_export
    from actlab.transforms.steer import InterventionRecipe

    out = Path(out).expanduser()
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out.suffix.lower() != ".gguf":
        raise ConfigError(f"--out {out}: a GGUF export is one file; give a path ending in .gguf")
    if out.exists():
        raise ConfigError(f"{out} already exists")
    if isinstance(recipe, InterventionRecipe):
        return export_control_vector(lm, recipe, out)
    cfg = lm.model.config
    family = GGUF_FAMILIES.get(cfg.model_type)
    if family is None:
        raise ConfigError(f"GGUF export of {cfg.model_type} is not supported (llama.cpp architectures actlab writes: "
                          f"{', '.join(sorted(GGUF_FAMILIES))})")
    folded, embedded = plan_export(lm, recipe)
    if embedded:
        raise ConfigError(f"{embedded[0].describe()} is a runtime transform that llama.cpp cannot run; export it with "
                          "--format hf (actlab re-attaches it) or export the model without it")
    model = folded_model(lm, folded)
    cfg = model.config
    reason = _unsupported_variant(cfg)
    if reason:
        raise ConfigError(f"GGUF export: {reason}")
    arch = getattr(gguf.MODEL_ARCH, family.arch)
    names = gguf.get_tensor_name_map(arch, int(cfg.num_hidden_layers))
    tied = getattr(cfg, "tie_word_embeddings", False)
    grids = _quant_grids(model)
    types: list[str] = []
    written = 0
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
        _hparams(writer, cfg, lm)
        _tokenizer(writer, lm)
        tensors = model.state_dict()
        for name, tensor in tensors.items():
            if tied and name.endswith("lm_head.weight"):
                continue  # llama.cpp reads the embedding when the output matrix is absent
            target = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if target is None:
                if name.endswith(("attn.bias", "attn.masked_bias")):  # GPT-2's causal-mask buffers
                    continue
                raise ConfigError(f"GGUF export: no GGUF name for tensor {name} ({cfg.model_type})")
            data = family.tensor(name, tensor.detach().float().cpu(), cfg).numpy()
            kind = _tensor_type(name, data, grids, dtype)
            if kind in BLOCK_TYPES:
                qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
                writer.add_tensor(target, gguf.quants.quantize(np.ascontiguousarray(data, np.float32), qtype),
                                  raw_dtype=qtype)
                types.append(kind)
            else:
                plain = data.astype(np.float16 if kind == "f16" else np.float32)
                writer.add_tensor(target, np.ascontiguousarray(plain))
            written += 1
        writer.add_file_type(_file_type(types, dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    counts = {t: types.count(t) for t in sorted(set(types))}
    kinds = ", ".join(f"{n} {t.upper()}" for t, n in counts.items())
    return {"path": str(out), "format": "gguf", "arch": gguf.MODEL_ARCH_NAMES[arch], "tensors": written,
            "dtype": dtype, "block_types": counts, "folded": [p.describe() for p in folded], "embedded": [],
            "notes": [f"GGUF {gguf.MODEL_ARCH_NAMES[arch]} ({written} tensors{'; ' + kinds if kinds else ''}; "
                      f"others {dtype if dtype not in BLOCK_TYPES else 'f32 (vectors)'})"] +
                     ([f"folded: {', '.join(p.describe() for p in folded)}"] if folded else [])}


def _quant_grids(model: Any) -> dict[str, Any]:
    """HF tensor name -> the grid a folded quant recipe left on its module (fused views: the narrowest)."""
    from actlab.transforms.quant.recipe import QUANT_GRIDS

    out = {}
    for name, module in model.named_modules():
        grids = getattr(module, QUANT_GRIDS, None)
        if grids:
            out[f"{name}.weight"] = min(grids, key=lambda g: g.bits)
    return out


def _tensor_type(name: str, data: np.ndarray, grids: dict[str, Any], dtype: str) -> str:
    """The GGUF type one tensor is written in: its quant grid's, else `dtype` for matrices; vectors float32."""
    if data.ndim < 2:
        return "f32"
    kind = block_type_for(grids[name]) if name in grids else dtype
    if kind in BLOCK_TYPES and data.shape[-1] % BLOCK:
        raise ConfigError(f"GGUF export: {name} has {data.shape[-1]} input channels, not a multiple of GGUF's "
                          f"blocks of {BLOCK}; export it in f32 or f16")
    return kind


def _unsupported_variant(cfg: Any) -> str | None:
    """What llama.cpp would compute differently from this config (it hard-codes a few Gemma-3 choices)."""
    if cfg.model_type != "gemma3_text":
        return None
    types = list(getattr(cfg, "layer_types", None) or [])
    llama_cpp = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(len(types))]
    if types != llama_cpp:
        return ("llama.cpp runs Gemma-3 with every 6th layer global and the rest sliding; this model's layer types "
                "differ (e.g. after removing layers)")
    if getattr(cfg, "query_pre_attn_scalar", cfg.head_dim) != cfg.head_dim:
        return "llama.cpp scales Gemma-3 attention by 1/sqrt(head_dim); this model's query_pre_attn_scalar differs"
    return None


def _rope_theta(cfg: Any, kind: str = "full_attention") -> float | None:
    params = getattr(cfg, "rope_parameters", None) or {}
    if kind in params and isinstance(params[kind], dict):
        params = params[kind]
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return theta if theta is not None else getattr(cfg, "rope_theta", None)


def _hparams(writer: Any, cfg: Any, lm: Any) -> None:
    ad = lm.adapter
    writer.add_name(str(getattr(cfg, "_name_or_path", "") or lm.name))
    writer.add_context_length(int(getattr(cfg, "max_position_embeddings", None) or cfg.n_positions))
    writer.add_embedding_length(ad.hidden_size)
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(ad.intermediate_size)
    writer.add_head_count(ad.num_heads)
    writer.add_head_count_kv(ad.num_kv_heads)
    writer.add_vocab_size(ad.vocab_size)
    if getattr(cfg, "rms_norm_eps", None) is not None:
        writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    else:
        writer.add_layer_norm_eps(float(getattr(cfg, "layer_norm_epsilon", 1e-5)))
    theta = _rope_theta(cfg)
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
        writer.add_rope_dimension_count(ad.head_dim)
    if getattr(cfg, "head_dim", None) or ad.head_dim * ad.num_heads != ad.hidden_size:
        writer.add_key_length(ad.head_dim)
        writer.add_value_length(ad.head_dim)
    if getattr(cfg, "sliding_window", None) and cfg.model_type == "gemma3_text":
        writer.add_sliding_window(int(cfg.sliding_window))


def _tokenizer(writer: Any, lm: Any) -> None:
    source = _source_gguf(lm)
    if source is not None:
        _copy_tokenizer(writer, source)
        return
    _bpe_tokenizer(writer, lm.tokenizer)


def _source_gguf(lm: Any) -> Path | None:
    from actlab.models.cache import downloads_dir

    name = lm.provenance.get("gguf")
    if not name:
        return None
    for candidate in (Path(name), downloads_dir() / Path(name).name):
        if candidate.is_file():
            return candidate
    return None


def _copy_tokenizer(writer: Any, source: Path) -> None:
    """Every tokenizer.* field of the source GGUF, as it is."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), kind)


def _bpe_tokenizer(writer: Any, tokenizer: Any) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ConfigError("GGUF export needs the source GGUF or a byte-level BPE tokenizer (tokenizer.json); this "
                          f"tokenizer is {model.get('type') or type(tokenizer).__name__}")
    vocab = dict(model["vocab"])
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, index in vocab.items():
        tokens[index] = text
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    import gguf

    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("pad_token_id", writer.add_pad_token_id), ("unk_token_id", writer.add_unk_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)


def export_control_vector(lm: Any, recipe: Any, out: Path) -> dict[str, Any]:
    """A steering recipe as llama.cpp's control-vector GGUF (the format repeng writes): architecture
    "controlvector", one `direction.{i}` per layer i, added to the output of layer i (the coefficient folded in;
    llama.cpp's --control-vector-scaled multiplies again). llama.cpp has no slot for layer 0's output."""
    import gguf

    from actlab.models.keys import split_key

    recipe.check_model(lm)
    directions: dict[int, torch.Tensor] = {}
    for edit in recipe.edits:
        layer, kind = split_key(edit.site) if edit.site.startswith("L") else (None, edit.site)
        if (edit.op != "add" or kind != "resid_out" or edit.heads is not None or edit.channels is not None
                or edit.positions is not None):
            raise ConfigError(f"a control vector adds one vector to layer outputs at every position; {edit.site} "
                              f"({edit.op}{', some heads, channels or positions' if edit.op == 'add' else ''}) is "
                              "not that: export this recipe with --format hf")
        if layer == 0:
            raise ConfigError("llama.cpp's control vectors cannot steer layer 0's output (direction.0 is refused "
                              "by its loader); train from layer 1 on")
        vector = edit.coeff * edit.value.float()
        directions[layer] = directions[layer] + vector if layer in directions else vector
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "controlvector")
        writer.add_string("controlvector.model_hint", lm.model.config.model_type)
        writer.add_uint32("controlvector.layer_count", len(directions))
        for layer in sorted(directions):
            writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(directions[layer].numpy()))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"path": str(out), "format": "gguf", "arch": "controlvector", "tensors": len(directions),
            "dtype": "f32", "folded": [], "embedded": [recipe.describe()],
            "notes": [f"llama.cpp control vector: layers {', '.join(map(str, sorted(directions)))} "
                      "(llama-cli --control-vector FILE)"]}
