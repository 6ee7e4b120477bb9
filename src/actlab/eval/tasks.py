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
from actlab.models.loader import LoadedModel
from actlab.progress import track

BATCH_TOKENS = 4096


@dataclass
class TaskResult:
    task: str
    items: int
    acc: float
    acc_norm: float
    seconds: float


def _encode(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    ctx = tokenizer(context)["input_ids"]
    full = tokenizer(context + continuation)["input_ids"]
    if full[: len(ctx)] != ctx:  # the continuation merged into the context's last token: fall back
        full = ctx + tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return full, len(full) - len(ctx)


@torch.no_grad()
def loglikelihoods(lm: LoadedModel, requests: list[tuple[list[int], int]], progress: bool = True) -> list[float]:
    """Sum of log p(continuation tokens | preceding tokens) for each (ids, continuation length)."""
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    out = [0.0] * len(requests)
    batches, batch = [], []
    for i in order:
        if batch and len(requests[batch[0]][0]) * (len(batch) + 1) > BATCH_TOKENS:
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    pad = lm.tokenizer.pad_token_id or 0
    for batch in track(batches, total=len(batches), description="scoring", enabled=progress):
        width = len(requests[batch[0]][0])
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            seq = requests[i][0]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        # Only positions that predict a continuation token need the LM head (on Gemma's 262k vocabulary the
        # head and its log-softmax cost more than the layers): keep the span they cover in this batch.
        first = min(len(requests[i][0]) - requests[i][1] - 1 for i in batch)
        last = max(len(requests[i][0]) - 1 for i in batch)
        keep = torch.arange(first, last, device=lm.device)
        logits = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                          logits_to_keep=keep).logits.float()
        logprobs = F.log_softmax(logits, dim=-1)
        for row, i in enumerate(batch):
            seq, n = requests[i]
            positions = torch.arange(len(seq) - n - 1, len(seq) - 1) - first
            targets = torch.tensor(seq[len(seq) - n :])
            out[i] = float(logprobs[row, positions, targets].sum())
    return out


def evaluate_task(lm: LoadedModel, name: str, items: list[Choice], progress: bool = True) -> TaskResult:
    start = time.perf_counter()
    requests, owners = [], []
    for item_index, item in enumerate(items):
        for cont in item.continuations:
            requests.append(_encode(lm.tokenizer, item.context, cont))
            owners.append(item_index)
    scores = loglikelihoods(lm, requests, progress)
    correct = correct_norm = 0
    k = 0
    for item in items:
        s = scores[k : k + len(item.continuations)]
        norm = [v / len(c) for v, c in zip(s, item.continuations)]
        correct += int(max(range(len(s)), key=s.__getitem__) == item.label)
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == item.label)
        k += len(item.continuations)
    return TaskResult(name, len(items), correct / len(items), correct_norm / len(items),
                      time.perf_counter() - start)
