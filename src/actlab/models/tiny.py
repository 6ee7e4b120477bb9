"""Tiny random-init models, one per supported architecture, for fast deterministic tests.

Each is built from its transformers config class with a fixed seed (no download, a few hundred KB)
and comes with a byte-level tokenizer (256 byte tokens + 4 specials) that adds a BOS token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

TINY_SEED = 1234
MAX_POSITIONS = 512
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: every UTF-8 byte is one token; BOS is prepended like Llama's."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=MAX_POSITIONS,
    )


def _common(vocab: int) -> dict:
    return dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _llama(vocab: int) -> PretrainedConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, initializer_range=0.08,
                       tie_word_embeddings=True, **_common(vocab))


def _mistral(vocab: int) -> PretrainedConfig:
    return MistralConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, sliding_window=None,
                         initializer_range=0.08, **_common(vocab))


def _qwen2(vocab: int) -> PretrainedConfig:
    return Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, initializer_range=0.08,
                       tie_word_embeddings=True, **_common(vocab))


def _qwen3(vocab: int) -> PretrainedConfig:
    return Qwen3Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=MAX_POSITIONS,
                       initializer_range=0.08, tie_word_embeddings=True, **_common(vocab))


def _mixtral(vocab: int) -> PretrainedConfig:
    return MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                         max_position_embeddings=MAX_POSITIONS, initializer_range=0.08, **_common(vocab))


def _qwen3_moe(vocab: int) -> PretrainedConfig:
    """Experts in layers 0 and 2, a dense MLP in layer 1 (mlp_only_layers); top-k weights not renormalised."""
    return Qwen3MoeConfig(hidden_size=64, intermediate_size=160, moe_intermediate_size=48, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=6,
                          num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1],
                          max_position_embeddings=MAX_POSITIONS, initializer_range=0.08, tie_word_embeddings=True,
                          **_common(vocab))


def _gemma3(vocab: int) -> PretrainedConfig:
    return Gemma3TextConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                            max_position_embeddings=MAX_POSITIONS, initializer_range=0.08, **_common(vocab))


def _gemma2(vocab: int) -> PretrainedConfig:
    return Gemma2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        attn_logit_softcapping=20.0, final_logit_softcapping=15.0,
                        max_position_embeddings=MAX_POSITIONS, initializer_range=0.08, **_common(vocab))


def _olmo2(vocab: int) -> PretrainedConfig:
    return Olmo2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, initializer_range=0.08,
                       tie_word_embeddings=False, **_common(vocab))


def _phi3(vocab: int) -> PretrainedConfig:
    # fused qkv_proj and gate_up_proj; half of each head turned by the rotary embedding (as in Phi-4-mini)
    return Phi3Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
                      original_max_position_embeddings=MAX_POSITIONS, initializer_range=0.08,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                      **_common(vocab))


def _gpt_neox(vocab: int) -> PretrainedConfig:
    # Pythia's layout: parallel residual, q/k/v fused head after head, a quarter of each head rotated
    return GPTNeoXConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=MAX_POSITIONS, initializer_range=0.08, use_parallel_residual=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "partial_rotary_factor": 0.25}, **_common(vocab))


def _gpt2(vocab: int) -> PretrainedConfig:
    return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS, initializer_range=0.08,
                      **_common(vocab))


def _opt(vocab: int) -> PretrainedConfig:
    return OPTConfig(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=MAX_POSITIONS, word_embed_proj_dim=64, init_std=0.08,
                     **_common(vocab))


TINY_CONFIGS: dict[str, Callable[[int], PretrainedConfig]] = {
    "tiny-llama": _llama,
    "tiny-mistral": _mistral,
    "tiny-qwen2": _qwen2,
    "tiny-qwen3": _qwen3,
    "tiny-gemma3": _gemma3,
    "tiny-gemma2": _gemma2,
    "tiny-olmo2": _olmo2,
    "tiny-phi3": _phi3,
    "tiny-gpt-neox": _gpt_neox,
    "tiny-mixtral": _mixtral,
    "tiny-qwen3-moe": _qwen3_moe,
    "tiny-gpt2": _gpt2,
    "tiny-opt": _opt,
}


def build_tiny(name: str) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    tokenizer = byte_tokenizer()
    config = TINY_CONFIGS[name](len(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _perturb_norms(model)
    return model.eval(), tokenizer


def _perturb_norms(model: torch.nn.Module) -> None:
    """Random-init norms are all-ones (or zero for Gemma's 1+w); give them spread so that a test
    which forgets a norm's weight fails instead of passing by accident."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if "norm" in type(module).__name__.lower() and isinstance(weight, torch.nn.Parameter):
            with torch.no_grad():
                weight.add_(0.3 * torch.randn_like(weight))
