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
    """`tokens` greedy tokens after `ids` from the HF model. Timed (`clock`): HF `generate` itself, the baseline a
    user would run. Otherwise the model's own forward with its KV cache, one token at a time: `generate` would
    stop at EOS, or with min_new_tokens suppress it, where the engine (like llama.cpp) just takes the argmax."""
    if clock is None:
        return greedy_reference(lm, ids, tokens)
    from transformers import LogitsProcessorList

    out = lm.model.generate(torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                            pad_token_id=lm.tokenizer.pad_token_id or 0,
                            logits_processor=LogitsProcessorList([clock]))
    return out[0, len(ids):].tolist()


@torch.no_grad()
def greedy_reference(lm, ids: list[int], tokens: int) -> list[int]:
    """Greedy decoding through the model's forward and KV cache (no generate machinery, no EOS handling)."""
    from actlab.models.compat import output_cache, with_cache

    out = lm.model(input_ids=torch.tensor([ids], device=lm.device), use_cache=True)
    new = [int(out.logits[0, -1].argmax())]
    for _ in range(tokens - 1):
        out = lm.model(input_ids=torch.tensor([[new[-1]]], device=lm.device),
                       **with_cache(lm.model, output_cache(out)), use_cache=True)
        new.append(int(out.logits[0, -1].argmax()))
    return new
