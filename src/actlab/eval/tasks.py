"""Zero-shot accuracy by log-likelihood scoring of the choices, as lm-evaluation-harness does.

For each choice, the continuation's tokens are those of tokenize(context + continuation) after the
context's own tokens; its score is the sum of their log-probabilities. `acc` picks the highest sum,
`acc_norm` the highest sum per character of the continuation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from actlab.data.tasks import Choice
from actlab.models.compat import output_cache, with_cache
from actlab.models.loader import LoadedModel
from actlab.progress import track


@dataclass
class TaskResult:
    task: str
    items: int
    acc: float
    acc_norm: float
    seconds: float


def encode_item(tokenizer, item: Choice) -> tuple[list[int], list[list[int]]]:
    """The context's tokens and each choice's continuation tokens (those after the context's own)."""
    context = tokenizer(item.context)["input_ids"]
    continuations = []
    for text in item.continuations:
        full = tokenizer(item.context + text)["input_ids"]
        if full[: len(context)] != context:  # the continuation merged into the context's last token: fall back
            full = context + tokenizer(text, add_special_tokens=False)["input_ids"]
        continuations.append(full[len(context):])
    return context, continuations


@torch.no_grad()
def choice_loglikelihoods(lm: LoadedModel, context: list[int], continuations: list[list[int]]) -> list[float]:
    """Sum of log p(continuation tokens | context, preceding continuation tokens) for each continuation.

    The shared context runs once; its KV cache is repeated for the choices, which run as one right-padded
    batch (padding sits after every real token, so causal attention never sees it). Only positions that
    predict a continuation token go through the LM head (Gemma's 262k-token head costs more than its layers).
    """
    device = lm.device
    out = lm.model(input_ids=torch.tensor([context], device=device), use_cache=True, logits_to_keep=1)
    first = F.log_softmax(out.logits[0, -1].float(), dim=-1)
    scores = [float(first[c[0]]) if c else 0.0 for c in continuations]
    width = max(len(c) for c in continuations)
    if width <= 1:
        return scores
    cache = output_cache(out)
    cache.batch_repeat_interleave(len(continuations))
    ids = torch.zeros((len(continuations), width), dtype=torch.long)
    for row, c in enumerate(continuations):
        ids[row, : len(c)] = torch.tensor(c)
    logits = lm.model(input_ids=ids.to(device), **with_cache(lm.model, cache), use_cache=True,
                      logits_to_keep=torch.arange(width - 1, device=device)).logits.float()
    rest = F.log_softmax(logits, dim=-1).cpu()
    for row, c in enumerate(continuations):
        if len(c) > 1:
            scores[row] += float(rest[row, torch.arange(len(c) - 1), torch.tensor(c[1:], dtype=torch.long)].sum())
    return scores


def evaluate_task(lm: LoadedModel, name: str, items: list[Choice], progress: bool = True) -> TaskResult:
    start = time.perf_counter()
    correct = correct_norm = 0
    for item in track(items, total=len(items), description=name, enabled=progress):
        s = choice_loglikelihoods(lm, *encode_item(lm.tokenizer, item))
        norm = [v / len(c) for v, c in zip(s, item.continuations)]
        correct += int(max(range(len(s)), key=s.__getitem__) == item.label)
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == item.label)
    return TaskResult(name, len(items), correct / len(items), correct_norm / len(items),
                      time.perf_counter() - start)
