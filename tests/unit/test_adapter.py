"""The adapter's view of every supported architecture reproduces the model's own forward."""

from __future__ import annotations

import pytest
import torch

import actlab
from actlab.errors import UnsupportedArchitectureError
from actlab.models.adapter import adapter_for


class Recorder:
    """Plain forward hooks (independent of actlab's probe engine) recording module inputs/outputs."""

    def __init__(self):
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []

    def watch(self, name: str, module: torch.nn.Module) -> None:
        def hook(_m, args, out):
            self.inputs[name] = args[0]
            self.outputs[name] = out[0] if isinstance(out, tuple) else out

        self.handles.append(module.register_forward_hook(hook))

    def close(self):
        for h in self.handles:
            h.remove()


def _run(lm: actlab.LoadedModel, rec: Recorder) -> torch.Tensor:
    ids = lm.tokenizer("The adapter must reproduce the forward pass exactly.", return_tensors="pt").input_ids
    try:
        with torch.no_grad():
            return lm.model(ids).logits
    finally:
        rec.close()


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.reshape(b.shape), b, rtol=1e-5, atol=1e-5)


def _mlp_output_module(layer):
    """The module whose output is the MLP branch: the down projection, or the whole mixture of experts."""
    return layer.mlp if layer.moe is not None else layer.linears["down"].module


def test_shapes_match_config(tiny: actlab.LoadedModel):
    ad = tiny.adapter
    cfg = tiny.model.config
    assert ad.num_layers == cfg.num_hidden_layers
    for layer in ad.layers:
        q, k, v = (layer.head_projections[r] for r in "qkv")
        assert q.out_features == ad.num_heads * ad.head_dim
        assert k.out_features == v.out_features == ad.num_kv_heads * ad.head_dim
        assert layer.linears["o"].in_features == ad.num_heads * ad.head_dim
        if layer.moe is not None:  # experts: [E, 2I, H] and [E, H, I]; the router [E, H]
            moe = layer.moe
            assert moe.num_experts == getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
            assert moe.top_k == cfg.num_experts_per_tok
            for e in range(moe.num_experts):
                assert moe.weight(e, "gate").shape == moe.weight(e, "up").shape == (layer.ffn_width, ad.hidden_size)
                assert moe.weight(e, "down").shape == (ad.hidden_size, layer.ffn_width)
            continue
        assert layer.linears["down"].in_features == layer.ffn_width
        assert layer.linears["gate"].in_features == ad.hidden_size
    # every projection module is counted once, and every expert's weights and the routers
    assert ad.linear_params() == sum(
        m.weight.numel() for lyr in ad.layers for m in {id(x.module): x.module for x in lyr.linears.values()}.values()
    ) + sum(p.numel() for lyr in ad.layers if lyr.moe for p in lyr.mlp.parameters())


def test_mlp_recomputed_from_adapter(tiny: actlab.LoadedModel):
    rec = Recorder()
    for layer in tiny.adapter.layers:
        rec.watch(f"{layer.index}.mlp_norm", layer.mlp_norm if layer.mlp_norm is not None else layer.mlp)
        rec.watch(f"{layer.index}.down", _mlp_output_module(layer))
    _run(tiny, rec)
    for layer in tiny.adapter.layers:
        x = rec.outputs[f"{layer.index}.mlp_norm"] if layer.mlp_norm is not None else \
            rec.inputs[f"{layer.index}.mlp_norm"]
        if layer.moe is not None:  # every expert recomputed densely, weighted by the recomputed routing
            _close(layer.moe.apply(x), rec.outputs[f"{layer.index}.down"])
            continue
        h = layer.act_fn(layer.linears["gate"].apply(x))
        if layer.gated_mlp:
            h = h * layer.linears["up"].apply(x)
        _close(layer.linears["down"].apply(h), rec.outputs[f"{layer.index}.down"])


def test_attention_projections_and_residual_stream(tiny: actlab.LoadedModel):
    rec = Recorder()
    ad = tiny.adapter
    for layer in ad.layers:
        i = layer.index
        rec.watch(f"{i}.layer", layer.module)
        rec.watch(f"{i}.attn_norm", layer.attn_norm if layer.attn_norm is not None else torch.nn.Identity())
        rec.watch(f"{i}.mlp_in", layer.mlp_norm if layer.mlp_norm is not None else layer.mlp)
        rec.watch(f"{i}.o", layer.linears["o"].module)
        rec.watch(f"{i}.down", _mlp_output_module(layer))
        for role, view in layer.linears.items():
            if role in ("q", "k", "v", "qkv"):
                rec.watch(f"{i}.{role}", view.module)
    rec.watch("final_norm", ad.final_norm)
    logits = _run(tiny, rec)
    for layer in ad.layers:
        i = layer.index
        resid_in = rec.inputs[f"{i}.layer"]
        x = rec.outputs[f"{i}.attn_norm"] if layer.attn_norm is not None else resid_in  # OLMo-2: no pre-norm
        if layer.attn_norm is not None:
            _close(layer.attn_norm(resid_in), x)
        if "qkv" in layer.linears:
            fused = rec.outputs[f"{i}.qkv"]
            parts = [layer.head_projections[r].apply(x) for r in "qkv"]
            if ad.spec.qkv_layout == "heads":  # GPT-NeoX: [q_h; k_h; v_h] per head
                per_head = [p.reshape(*p.shape[:-1], ad.num_heads, ad.head_dim) for p in parts]
                _close(torch.cat(per_head, dim=-1).flatten(-2), fused)
            else:
                _close(torch.cat(parts, dim=-1), fused)
        else:
            for r in "qkv":
                _close(layer.head_projections[r].apply(x), rec.outputs[f"{i}.{r}"])
        _close(layer.linears["o"].apply(rec.inputs[f"{i}.o"]), rec.outputs[f"{i}.o"])
        # residual stream: resid_mid = resid_in + attn branch; resid_out = resid_mid + mlp branch
        attn_branch = rec.outputs[f"{i}.o"]
        if layer.attn_post_norm is not None:
            attn_branch = layer.attn_post_norm(attn_branch)
        resid_mid = rec.inputs[f"{i}.mlp_in"]
        mlp_branch = rec.outputs[f"{i}.down"]
        if layer.mlp_post_norm is not None:
            mlp_branch = layer.mlp_post_norm(mlp_branch)
        if ad.parallel_residual:  # GPT-NeoX: both sublayers read the block's input
            _close(resid_in, resid_mid)
            _close(resid_in + attn_branch.reshape(resid_in.shape) + mlp_branch.reshape(resid_in.shape),
                   rec.outputs[f"{i}.layer"])
            continue
        _close(resid_in + attn_branch.reshape(resid_in.shape), resid_mid)
        _close(resid_mid.reshape(mlp_branch.shape) + mlp_branch, rec.outputs[f"{i}.layer"])
    last = rec.outputs[f"{ad.num_layers - 1}.layer"]
    head = ad.lm_head(ad.final_norm(last))
    cap = getattr(tiny.model.config, "final_logit_softcapping", None)  # Gemma-2 caps its logits
    _close(cap * torch.tanh(head / cap) if cap else head, logits)


def test_gpt2_conv1d_weights_are_transposed():
    lm = actlab.load_model("tiny-gpt2")
    view = lm.adapter.layers[0].linears["gate"]
    assert view.transposed
    assert view.weight().shape == (view.module.nf, lm.adapter.hidden_size)
    assert torch.equal(view.weight(), view.module.weight.t())


def test_unsupported_architecture_names_supported_ones():
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match=r"'bloom'.*not supported.*llama.*opt"):
        adapter_for(model)


def test_post_layernorm_opt_variant_is_refused():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                     vocab_size=50, word_embed_proj_dim=32, do_layer_norm_before=False))
    with pytest.raises(UnsupportedArchitectureError, match="post-LayerNorm"):
        adapter_for(model)
