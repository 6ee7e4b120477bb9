"""Neuron -> token decoding against a hand computation from the raw weights."""

from __future__ import annotations

import pandas as pd
import pytest

from actlab.analyze.neurons import decode_neurons, neuron_tokens
from actlab.errors import ConfigError


def test_promoted_tokens_are_the_unembedding_of_the_normed_output_column(tiny_llama):
    lm = tiny_llama
    model = lm.model
    layer, neuron = 1, 7
    column = model.model.layers[layer].mlp.down_proj.weight[:, neuron].double()
    # RMSNorm by hand: w / rms(w) * gain, then the tied or untied unembedding
    normed = column / column.pow(2).mean().add(model.config.rms_norm_eps).sqrt() * model.model.norm.weight.double()
    logits = model.lm_head.weight.double() @ normed
    logits = logits - logits.mean()
    want_up = logits.topk(5).indices.tolist()
    want_down = logits.topk(5, largest=False).indices.tolist()
    (row,) = decode_neurons(lm, layer, [neuron], top=5)
    assert row["promotes"] == [lm.tokenizer.decode([t]) for t in want_up]
    assert row["suppresses"] == [lm.tokenizer.decode([t]) for t in want_down]
    assert row["promote_logits"] == pytest.approx(logits[want_up].tolist(), rel=1e-4, abs=1e-5)
    assert row["out_norm"] == pytest.approx(float(column.norm()), rel=1e-6)


def test_the_report_table_skips_dead_neurons_and_picks_the_strongest_writers(tiny_llama):
    lm = tiny_llama
    width = lm.adapter.layers[0].linears["down"].weight().shape[1]
    norms = lm.adapter.layers[0].linears["down"].weight().float().norm(dim=0)
    strongest = int(norms.argmax())
    neurons = pd.DataFrame({"layer": 0, "neuron": range(width), "freq_0.01": 0.5,
                            "dead": [n == strongest for n in range(width)], "always_on": False})
    table = neuron_tokens(lm, neurons, per_layer=2)
    first = table[table["layer"] == 0]
    assert strongest not in first["neuron"].tolist() and len(first) == 2
    alive = norms.clone()
    alive[strongest] = -1
    assert first["neuron"].tolist() == alive.topk(2).indices.tolist()
    assert set(table["layer"]) == set(range(lm.adapter.num_layers))


def test_bad_neurons_are_one_line_errors(tiny_llama):
    with pytest.raises(ConfigError, match="out of range"):
        decode_neurons(tiny_llama, 0, [10**6])
    with pytest.raises(ConfigError, match="layer 99 out of range"):
        decode_neurons(tiny_llama, 99, [0])
