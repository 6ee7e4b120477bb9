"""Activation patching and attribution patching over clean / corrupted prompt pairs (the math and the runs).

For a pair, the metric m (logit difference of the answer over the wrong token at the last position, or the
answer's loss) is measured on the clean run, the corrupted run, and the corrupted run with one activation
taken from the clean run (denoising, as TransformerLens's `patching` module does). The effect of a patch is
normalised: (m_patched - m_corrupt) / (m_clean - m_corrupt), 1 = the patch restores the clean behaviour.

Tables: the residual stream entering each layer (L{i}.resid_in) per layer x position; each attention head's
input to o (L{i}.o_in, one head at every position) per layer x head; the MLP output (L{i}.down_out) per
layer x position.

Attribution patching (Nanda 2023; Syed et al. 2023) is the first-order estimate of every patch at once:
(a_clean - a_corrupt) . dm/da at the corrupted run, summed over the patched channels, from one backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from actlab.data.pairs import PatchPair
from actlab.errors import ConfigError
from actlab.models.keys import site_key
from actlab.probe.edit import Edit, Editor
from actlab.transforms.steer.intervene import record
from actlab.transforms.steer.recipe import SiteEdit

METRICS = ("logit-diff", "loss")
TABLES = {"resid": "resid_in", "heads": "o_in", "mlp": "down_out"}


@dataclass
class EncodedPair:
    clean: torch.Tensor  # [1, tokens]
    corrupt: torch.Tensor
    answer: int
    wrong: int


def encode_pairs(lm: Any, pairs: list[PatchPair]) -> list[EncodedPair]:
    """Token ids of each pair; clean and corrupted prompts must have one length (positions line up), and every
    pair the same one (the tables are per position)."""
    out = []
    for n, pair in enumerate(pairs, 1):
        clean, corrupt = (lm.tokenizer(t, verbose=False)["input_ids"] for t in (pair.clean, pair.corrupt))
        if len(clean) != len(corrupt):
            raise ConfigError(f"pair {n}: the clean prompt has {len(clean)} tokens, the corrupted {len(corrupt)}; "
                              "patching position by position needs prompts of one length")
        answer, wrong = (_first_token(lm, pair.clean, t) for t in (pair.answer, pair.wrong))
        if answer == wrong:
            raise ConfigError(f"pair {n}: answer {pair.answer!r} and wrong {pair.wrong!r} start with the same token")
        out.append(EncodedPair(torch.tensor([clean]), torch.tensor([corrupt]), answer, wrong))
    lengths = {p.clean.shape[1] for p in out}
    if len(lengths) > 1:
        raise ConfigError(f"the pairs have prompts of {len(lengths)} different lengths ({sorted(lengths)}); the "
                          "per-position tables need one length (template the prompts)")
    return out


def _first_token(lm: Any, prompt: str, continuation: str) -> int:
    whole = lm.tokenizer(prompt + continuation, verbose=False)["input_ids"]
    alone = lm.tokenizer(prompt, verbose=False)["input_ids"]
    if len(whole) <= len(alone):
        raise ConfigError(f"{continuation!r} adds no token after the prompt")
    return int(whole[len(alone)])


def metric_fn(name: str) -> Callable[[torch.Tensor, EncodedPair], torch.Tensor]:
    if name not in METRICS:
        raise ConfigError(f"unknown patching metric {name!r}; one of {', '.join(METRICS)}")
    if name == "logit-diff":
        return lambda logits, p: logits[0, -1, p.answer] - logits[0, -1, p.wrong]
    return lambda logits, p: -torch.log_softmax(logits[0, -1].double(), -1)[p.answer]


def _metric(lm, ids, pair, metric, edits=()) -> float:
    with torch.no_grad(), Editor(lm, [e.edit(lm) for e in edits]):
        return float(metric(lm.model(input_ids=ids.to(lm.device)).logits.float(), pair))


def exact_patching(lm: Any, pair: EncodedPair, metric_name: str = "logit-diff",
                   tables: tuple[str, ...] = tuple(TABLES), step: Callable[[], None] | None = None
                   ) -> dict[str, Any]:
    """The normalised effect of every patch of one pair: {table: [layers, positions or heads]} and the metric's
    clean and corrupted values."""
    metric = metric_fn(metric_name)
    ad = lm.adapter
    clean_m, corrupt_m = _metric(lm, pair.clean, pair, metric), _metric(lm, pair.corrupt, pair, metric)
    scale = clean_m - corrupt_m
    if abs(scale) < 1e-9:
        raise ConfigError("the clean and corrupted prompts give the same metric: nothing to restore")
    sites = [site_key(i, TABLES[t]) for t in tables for i in range(ad.num_layers)]
    source = record(lm, pair.clean, sites)
    tokens = pair.clean.shape[1]
    out: dict[str, Any] = {"clean": clean_m, "corrupt": corrupt_m}
    for table in tables:
        width = ad.num_heads if table == "heads" else tokens
        grid = torch.zeros(ad.num_layers, width, dtype=torch.float64)
        for i in range(ad.num_layers):
            site = site_key(i, TABLES[table])
            for j in range(width):
                edit = (SiteEdit(site, "patch", source[site], heads=[j]) if table == "heads"
                        else SiteEdit(site, "patch", source[site], positions=[j]))
                grid[i, j] = (_metric(lm, pair.corrupt, pair, metric, [edit]) - corrupt_m) / scale
                if step:
                    step()
        out[table] = grid
    return out


def attribution_patching(lm: Any, pair: EncodedPair, metric_name: str = "logit-diff",
                         tables: tuple[str, ...] = tuple(TABLES)) -> dict[str, Any]:
    """First-order estimates of the same tables from one forward and backward pass of the corrupted prompt."""
    metric = metric_fn(metric_name)
    ad = lm.adapter
    sites = list(dict.fromkeys(site_key(i, TABLES[t]) for t in tables for i in range(ad.num_layers)))
    clean = record(lm, pair.clean, sites)
    deltas: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}

    def tap(name):
        def op(x, _ctx):  # x + 0, with the zero a leaf: its gradient is dm/dx, and the graph stays whole
            seen[name] = x.detach()
            deltas[name] = torch.zeros_like(x, requires_grad=True)
            return x + deltas[name]
        return op

    with torch.enable_grad(), Editor(lm, [Edit(name, tap(name)) for name in sites]):
        value = metric(lm.model(input_ids=pair.corrupt.to(lm.device)).logits.float(), pair)
        grads = dict(zip(sites, torch.autograd.grad(value, [deltas[s] for s in sites])))
    clean_m, corrupt_m = _metric(lm, pair.clean, pair, metric), float(value.detach())
    scale = clean_m - corrupt_m
    if abs(scale) < 1e-9:
        raise ConfigError("the clean and corrupted prompts give the same metric: nothing to restore")
    out: dict[str, Any] = {"clean": clean_m, "corrupt": corrupt_m}
    for table in tables:
        rows = []
        for i in range(ad.num_layers):
            site = site_key(i, TABLES[table])
            contribution = ((clean[site] - seen[site]) * grads[site]).double()[0]  # [tokens, channels]
            if table == "heads":
                contribution = contribution.reshape(contribution.shape[0], ad.num_heads, -1).sum((0, 2))
            else:
                contribution = contribution.sum(-1)
            rows.append(contribution / scale)
        out[table] = torch.stack(rows)
    return out


def average(results: list[dict[str, Any]], tables: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {t: torch.stack([r[t] for r in results]).mean(0) for t in tables}


