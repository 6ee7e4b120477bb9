"""Zero-shot scoring against an independent, one-request-at-a-time computation with full logits."""

from __future__ import annotations

import json

import pytest
import torch

from actlab.data.tasks import Choice, load_task
from actlab.errors import CorpusError
from actlab.eval import tasks as task_eval

from ..conftest import shared_data


def reference_loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    ids = context + continuation
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(float(logprobs[p - 1, ids[p]]) for p in range(len(context), len(ids)))


ITEMS = [
    Choice("Question: What do plants need to grow?\nAnswer:", (" sunlight and water", " darkness", " sand only"), 0),
    Choice("Question: How do you open a jar?\nAnswer:", (" Twist the lid.", " Freeze it for a year."), 1),
    Choice("Question: Which is a planet?\nAnswer:", (" Mars", " the Moon", " a comet", " Sirius, a bright star"), 3),
]


def test_choice_scores_match_full_sequences_with_full_logits(tiny):
    # the context runs once and its KV cache serves every choice; choices of unequal length share a padded batch
    for item in ITEMS:
        context, continuations = task_eval.encode_item(tiny.tokenizer, item)
        assert len({len(c) for c in continuations}) > 1 or len(continuations) == 2
        got = task_eval.choice_loglikelihoods(tiny, context, continuations)
        want = [reference_loglikelihood(tiny.model, context, c) for c in continuations]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_single_token_choices(tiny_llama):
    context = tiny_llama.tokenizer("Question: pick one\nAnswer:")["input_ids"]
    got = task_eval.choice_loglikelihoods(tiny_llama, context, [[5], [17]])
    want = [reference_loglikelihood(tiny_llama.model, context, [t]) for t in (5, 17)]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_accuracy_from_independent_scores(tiny):
    result = task_eval.evaluate_task(tiny, "toy", ITEMS, progress=False)
    acc = acc_norm = 0
    for item in ITEMS:
        context, continuations = task_eval.encode_item(tiny.tokenizer, item)
        scores = [reference_loglikelihood(tiny.model, context, c) for c in continuations]
        per_char = [s / len(c) for s, c in zip(scores, item.continuations)]
        acc += scores.index(max(scores)) == item.label
        acc_norm += per_char.index(max(per_char)) == item.label
    assert (result.items, result.acc, result.acc_norm) == (3, acc / 3, acc_norm / 3)


def test_continuation_tokens_follow_the_context(tiny_llama):
    item = Choice("Question: a\nAnswer:", (" yes", " no"), 0)
    context, continuations = task_eval.encode_item(tiny_llama.tokenizer, item)
    full = [tiny_llama.tokenizer(item.context + c)["input_ids"] for c in item.continuations]
    assert context == tiny_llama.tokenizer(item.context)["input_ids"]
    assert all(f == context + c and c for f, c in zip(full, continuations))


def test_load_task_reads_the_shared_files():
    root = shared_data("tasks")
    first = json.loads((root / "arc" / "ARC-Easy-Test.jsonl").read_text().splitlines()[0])
    arc = load_task("arc_easy", 5)
    assert len(arc) == 5
    assert arc[0].context == f"Question: {first['question']['stem']}\nAnswer:"
    assert [c["label"] for c in first["question"]["choices"]][arc[0].label] == first["answerKey"]
    piqa = load_task("piqa")
    labels = (root / "piqa" / "valid-labels.lst").read_text().split()
    assert len(piqa) == len(labels) and all(len(p.continuations) == 2 for p in piqa)
    assert [p.label for p in piqa[:50]] == [int(x) for x in labels[:50]]


def test_unknown_task_is_a_clear_error():
    shared_data("tasks")
    with pytest.raises(CorpusError, match="unknown task 'hellaswag'"):
        load_task("hellaswag")
