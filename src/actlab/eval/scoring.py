"""Log-likelihood requests, computed as lm-evaluation-harness defines them.

A request is (context, continuation). Tokenization follows lm-eval's `_encode_pair`: trailing spaces of the
context move to the continuation; the continuation's tokens are those of tokenize(context + continuation)
after the context's own token count; the tokenizer's defaults decide special tokens (SmolLM2 adds none,
Gemma adds BOS - lm-eval adds BOS for Gemma models too); an empty context becomes the BOS (or EOS) token.
A request's score is the sum of the continuation tokens' log-probabilities, and `greedy` says whether every
continuation token is the argmax at its position.

Requests that share a context run it once; its KV cache is repeated for the continuations, which run as one
right-padded batch (padding sits after every real token, so causal attention never sees it). Only positions
that predict a continuation token go through the LM head (Gemma's 262k-token head costs more than its layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from actlab.models.compat import output_cache, with_cache


@dataclass(frozen=True)
class Score:
    loglikelihood: float
    greedy: bool
    tokens: int


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) of one request, lm-eval's way."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer(context + continuation, verbose=False)["input_ids"]
    context_ids = tokenizer(context, verbose=False)["input_ids"]
    continuation_ids = whole[len(context_ids):]
    if not context_ids:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        context_ids = [prefix]
    return context_ids, continuation_ids


def encode_shared(tokenizer, context: str, continuations: tuple[str, ...]) -> tuple[list[int], list[list[int]]]:
    """One context and several continuations: the context's tokens (identical for every request, as lm-eval
    encodes the context alone) and each continuation's."""
    pairs = [encode_pair(tokenizer, context, c) for c in continuations]
    return pairs[0][0], [p[1] for p in pairs]


def fit_context(lm, context: list[int], continuations: list[list[int]],
                split: int | None = None) -> tuple[list[int], int | None]:
    """The context lm-eval scores (its last tokens, where it and the longest continuation exceed the model's
    context) and where its question starts among them (None: no split)."""
    limit = lm.max_context
    if limit and len(context) + max(len(c) for c in continuations) > limit:  # lm-eval keeps the last tokens
        keep = limit - max(len(c) for c in continuations)
        if split is not None:
            split -= len(context) - max(1, keep)
        context = context[-max(1, keep):]
    return context, (split if split is not None and 0 < split < len(context) else None)


@torch.no_grad()
def score_continuations(lm, context: list[int], continuations: list[list[int]],
                        split: int | None = None) -> list[Score]:
    """Log-likelihood (and greediness) of each continuation after the shared `context`. With `split`, the context
    runs as two forwards - its first `split` tokens (a document: where a KV recipe compresses the cache), then the
    rest (the question) - which is what one forward computes unless the cache is transformed in between."""
    model, device = lm.model, lm.device
    context, split = fit_context(lm, context, continuations, split)
    ids = torch.tensor([context], device=device)
    if split is not None:
        document = model(input_ids=ids[:, :split], use_cache=True, logits_to_keep=1)
        return score_after(lm, read_rest(lm, ids[:, split:], output_cache(document)), continuations)
    return score_after(lm, model(input_ids=ids, use_cache=True, logits_to_keep=1), continuations)


def read_rest(lm, ids: torch.Tensor, cache):
    """The rest of a context (its question) after the cache of its beginning."""
    return lm.model(input_ids=ids, **with_cache(lm.model, cache), use_cache=True, logits_to_keep=1)


def score_after(lm, out, continuations: list[list[int]]) -> list[Score]:
    """The continuations' scores given the forward `out` that ended with the context (its last logits, its cache)."""
    model, device = lm.model, lm.device
    first = F.log_softmax(out.logits[0, -1].float(), dim=-1)
    sums = [float(first[c[0]]) if c else 0.0 for c in continuations]
    greedy = [bool(int(first.argmax()) == c[0]) if c else True for c in continuations]
    width = max(len(c) for c in continuations)
    if width > 1:
        cache = output_cache(out)
        cache.batch_repeat_interleave(len(continuations))
        ids = torch.zeros((len(continuations), width), dtype=torch.long)
        for row, c in enumerate(continuations):
            ids[row, : len(c)] = torch.tensor(c)
        logits = model(input_ids=ids.to(device), **with_cache(model, cache), use_cache=True,
                       logits_to_keep=torch.arange(width - 1, device=device)).logits.float()
        rest = F.log_softmax(logits, dim=-1).cpu()
        for row, c in enumerate(continuations):
            if len(c) > 1:
                positions, targets = torch.arange(len(c) - 1), torch.tensor(c[1:], dtype=torch.long)
                sums[row] += float(rest[row, positions, targets].sum())
                greedy[row] = greedy[row] and bool((rest[row, positions].argmax(-1) == targets).all())
    return [Score(s, g, len(c)) for s, g, c in zip(sums, greedy, continuations)]


def question_split(tokenizer, item, context: list[int]) -> int | None:
    """Where the question starts among the context's tokens: the longest prefix the document alone tokenizes to."""
    document = tokenizer(item.contexts[0][: item.question_at], verbose=False)["input_ids"]
    k = 0
    while k < min(len(document), len(context)) and document[k] == context[k]:
        k += 1
    return k or None


def score_item(lm, item) -> list[Score]:
    """Scores of an item's requests: one per choice (a shared context, or one context per choice). An item with a
    question after its document reads them in two forwards, unless an attached KV recipe is question-aware (it
    compresses after the question)."""
    from actlab.transforms.kv.session import question_aware

    tok = lm.tokenizer
    if len(item.contexts) == 1:
        context, continuations = encode_shared(tok, item.contexts[0], item.continuations)
        split = None
        if item.question_at is not None and not question_aware(lm):
            split = question_split(tok, item, context)
        return score_continuations(lm, context, continuations, split)
    out = []
    for context_text in item.contexts:  # partial scoring: one context per option, the same continuation
        context, continuation = encode_pair(tok, context_text, item.continuations[0])
        out.extend(score_continuations(lm, context, [continuation]))
    return out
