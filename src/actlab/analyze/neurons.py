"""Neuron -> token decoding: the tokens an MLP neuron promotes and suppresses when it fires (Geva et al. 2022,
"Transformer feed-forward layers build predictions by promoting concepts in the vocabulary space").

A neuron n of layer i writes a multiple of its column of the down projection, w = W_down[:, n], into the residual
stream. Read through the final norm and the unembedding (the logit lens of that direction), w's logits rank the
vocabulary: the top tokens are what the neuron promotes when its activation is positive, the bottom ones what it
suppresses (and the other way round for a negative activation). Models with a norm after the MLP (Gemma) scale
the whole MLP output, which this reading of one column leaves out.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from actlab.errors import ConfigError
from actlab.probe.stats.frequency import middle_frequency_column
from actlab.probe.stats.logit_lens import decode_residual

NEURONS_PER_LAYER = 3
TOKENS = 8


@torch.no_grad()
def decode_neurons(lm: Any, layer: int, neurons: list[int], top: int = TOKENS) -> list[dict[str, Any]]:
    """For each neuron of `layer`: its output norm and the `top` tokens it promotes and suppresses, with logits."""
    ad = lm.adapter
    if not 0 <= layer < ad.num_layers:
        raise ConfigError(f"layer {layer} out of range: the model has layers 0..{ad.num_layers - 1}")
    down = ad.layers[layer].linears["down"].weight()  # [hidden, neurons]
    bad = [n for n in neurons if not 0 <= n < down.shape[1]]
    if bad:
        raise ConfigError(f"neuron {bad[0]} out of range: layer {layer} has {down.shape[1]} neurons")
    columns = down[:, neurons].T.float()  # [neurons, hidden]
    logits = decode_residual(ad, columns.to(ad.lm_head.weight.dtype)).float()
    logits = logits - logits.mean(-1, keepdim=True)  # a constant shift promotes nothing
    up, down_ = logits.topk(top, dim=-1), logits.topk(top, dim=-1, largest=False)
    decode = lm.tokenizer.decode
    return [{"layer": layer, "neuron": n, "out_norm": float(columns[k].norm()),
             "promotes": [decode([int(t)]) for t in up.indices[k]], "promote_logits": up.values[k].tolist(),
             "suppresses": [decode([int(t)]) for t in down_.indices[k]], "suppress_logits": down_.values[k].tolist()}
            for k, n in enumerate(neurons)]


def neuron_tokens(lm: Any, neurons: pd.DataFrame | None = None, per_layer: int = NEURONS_PER_LAYER,
                  top: int = TOKENS) -> pd.DataFrame:
    """The table of the profile report: per layer, the `per_layer` neurons that write most strongly (largest
    output-column norm) among those that fire (not dead in the run's `neurons` table, when given), decoded."""
    rows = []
    for i, layer in enumerate(lm.adapter.layers):
        if "down" not in layer.linears:
            continue
        norms = layer.linears["down"].weight().float().norm(dim=0)
        freq = None
        if neurons is not None and len(neurons):
            mine = neurons[neurons["layer"] == i].set_index("neuron")
            if len(mine) == len(norms):
                alive = torch.tensor(~mine["dead"].to_numpy(dtype=bool))
                norms = torch.where(alive, norms, torch.full_like(norms, -1.0))
                freq = mine[middle_frequency_column(mine.columns)]
        chosen = norms.topk(min(per_layer, len(norms))).indices.tolist()
        for row in decode_neurons(lm, i, chosen, top):
            row["frequency"] = float(freq.loc[row["neuron"]]) if freq is not None else float("nan")
            row["promotes"] = " ".join(repr(t) for t in row["promotes"])
            row["suppresses"] = " ".join(repr(t) for t in row["suppresses"])
            row["top_promote_logit"] = row.pop("promote_logits")[0]
            row["top_suppress_logit"] = row.pop("suppress_logits")[0]
            rows.append(row)
    return pd.DataFrame(rows)
