"""The reference the engine is checked and timed against: HF `generate`, greedy, on a fixed prompt."""

from __future__ import annotations

import time

import torch

from actlab.data import load_corpus

PROMPT_TOKENS = 32


def prompt_ids(lm, length: int = PROMPT_TOKENS) -> list[int]:
    """A fixed prompt: the first `length` tokens of the evaluation half of the built-in corpus."""
    return lm.tokenizer(load_corpus(None, role="eval").text[:4000], verbose=False)["input_ids"][:length]


class FirstStepClock:
    """A logits processor that notes when generate finished the prefill (its first call)."""

    def __init__(self):
        self.t: float | None = None

    def __call__(self, input_ids, scores):
        if self.t is None:
            self.t = time.perf_counter()
        return scores


def hf_generate(lm, ids: list[int], tokens: int, clock: FirstStepClock | None = None) -> list[int]:
    from transformers import LogitsProcessorList

    out = lm.model.generate(torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                            pad_token_id=lm.tokenizer.pad_token_id or 0,
                            logits_processor=LogitsProcessorList([clock] if clock else []))
    return out[0, len(ids):].tolist()
