"""Several KV recipes on long documents, each document read once.

A KV recipe changes nothing while a document is read: it compresses the cache at the end of that forward (and
quantizes the token groups it completed, after attending in full precision). For items whose document and
question run as two forwards, the document's forward is therefore the dense model's for every column whose
recipes are all KV recipes that compress after the document (not question-aware ones). It runs once per item,
recording each layer's attention inputs; each column replays its compression on a copy of the cache (its press
sees the queries, keys and values it would have seen) and reads the question and the continuations itself. The
records are those of evaluating each column on its own (tests/unit/test_kv_tasks.py checks it); a document read
once instead of once per recipe is what makes a grid of methods x ratios x long contexts affordable on a CPU.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch

from actlab.eval.scoring import Score, encode_shared, fit_context, question_split, read_rest, score_after, score_item
from actlab.models.compat import output_cache


def shareable(recipe: Any) -> bool:
    """Whether a column's document forward is the dense model's: no recipe, or only KV recipes that compress after
    the document."""
    from actlab.transforms.compose import members
    from actlab.transforms.kv import KVRecipe

    return recipe is None or all(isinstance(r, KVRecipe) and not r.question_aware for r in members(recipe))


@torch.no_grad()
def score_shared(lm: Any, item: Any, recipes: list[Any]) -> tuple[list[list[Score]], list[tuple[int, int]]]:
    """Each recipe's scores of `item` (None: dense), the document read once; and what each recipe's cache held
    (kept, full) while the question and continuations attended."""
    from actlab.transforms import attach
    from actlab.transforms.kv.session import KVSession

    tok = lm.tokenizer
    context, continuations = encode_shared(tok, item.contexts[0], item.continuations)
    split = question_split(tok, item, context) if item.question_at is not None else None
    context, split = fit_context(lm, context, continuations, split)
    if split is None:  # nothing to share: each recipe on its own
        out = []
        for recipe in recipes:
            with attach(lm, recipe) if recipe is not None else contextlib.nullcontext():
                out.append(score_item(lm, item))
        return out, [(0, 0)] * len(recipes)
    ids = torch.tensor([context], device=lm.device)
    with contextlib.ExitStack() as stack:
        recorder = KVSession.attached(lm, stack)
        recorder.record = {}
        document = lm.model(input_ids=ids[:, :split], use_cache=True, logits_to_keep=1)
        record = recorder.record
    cache = output_cache(document)
    scores, held, memo = [], [], {}
    for recipe in recipes:
        mine = copy.deepcopy(cache)
        with contextlib.ExitStack() as stack:
            session = None
            if recipe is not None:
                stack.enter_context(attach(lm, recipe))
                session = KVSession.attached(lm, stack)
                session.replay(record, mine, memo)
            scores.append(score_after(lm, read_rest(lm, ids[:, split:], mine), continuations))
            held.append((session.kept, session.full) if session is not None else (0, 0))
    return scores, held
