"""Deterministic token windows: the one protocol every actlab measurement uses.

Protocol (the one of the GPTQ / AWQ / TEAL evaluation scripts, by default):
1. tokenize the whole corpus text once, with the tokenizer's defaults (so a tokenizer that adds BOS
   adds exactly one, at the very start) - `bos="tokenizer"`;
2. cut the token stream into windows of `seq_len` tokens starting at token `offset`, each window
   starting `stride` tokens after the previous one (`stride=seq_len`: consecutive, non-overlapping);
3. keep only full windows, the first `num_windows` of them (all if None).

`bos="every"` instead tokenizes without special tokens and starts every window with BOS followed by
`seq_len - 1` text tokens (stride defaults to `seq_len - 1`); `bos="none"` never adds BOS.
A perplexity over a window averages the loss of its `seq_len - 1` predicted tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from actlab.data.sources import Corpus
from actlab.errors import ConfigError, CorpusError

BosMode = Literal["tokenizer", "every", "none"]


@dataclass(frozen=True)
class WindowSpec:
    seq_len: int = 1024
    num_windows: int | None = None
    stride: int | None = None
    offset: int = 0
    bos: BosMode = "tokenizer"

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.num_windows is not None and self.num_windows < 1:
            raise ConfigError(f"the number of windows must be at least 1, got {self.num_windows}")
        if self.stride is not None and self.stride < 1:
            raise ConfigError(f"stride must be at least 1, got {self.stride}")
        if self.offset < 0:
            raise ConfigError(f"offset must be >= 0, got {self.offset}")
        if self.bos not in ("tokenizer", "every", "none"):
            raise ConfigError(f"bos must be tokenizer, every or none, got {self.bos!r}")

    @classmethod
    def for_tokens(cls, tokens: int, seq_len: int, **kw: Any) -> WindowSpec:
        """Enough windows to cover at least `tokens` tokens."""
        if tokens < 1:
            raise ConfigError(f"the number of tokens must be positive, got {tokens}")
        return cls(seq_len=seq_len, num_windows=math.ceil(tokens / seq_len), **kw)

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "stride": self.effective_stride}

    @property
    def effective_stride(self) -> int:
        if self.stride is not None:
            return self.stride
        return self.seq_len - 1 if self.bos == "every" else self.seq_len


def tokenize(tokenizer: Any, corpus: Corpus, add_special_tokens: bool = True) -> torch.Tensor:
    if not corpus.text.strip():
        raise CorpusError(f"corpus {corpus.name!r} is empty")
    ids = tokenizer(corpus.text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
    if len(ids) == 0:
        raise CorpusError(f"corpus {corpus.name!r} tokenizes to zero tokens")
    return torch.tensor(ids, dtype=torch.long)


def make_windows(tokenizer: Any, corpus: Corpus, spec: WindowSpec, max_context: int | None = None) -> torch.Tensor:
    """Return a [num_windows, seq_len] LongTensor following the protocol above."""
    if max_context is not None and spec.seq_len > max_context:
        raise ConfigError(f"seq_len {spec.seq_len} exceeds the model's context of {max_context} tokens")
    ids = tokenize(tokenizer, corpus, add_special_tokens=spec.bos == "tokenizer")
    body = spec.seq_len - 1 if spec.bos == "every" else spec.seq_len
    stride = spec.effective_stride
    available = 0 if len(ids) - spec.offset < body else (len(ids) - spec.offset - body) // stride + 1
    if available == 0:
        raise CorpusError(
            f"corpus {corpus.name!r} has {len(ids)} tokens (from offset {spec.offset}), fewer than one window "
            f"of {spec.seq_len}; use a shorter --seq-len or a larger corpus"
        )
    count = available if spec.num_windows is None else spec.num_windows
    if count > available:
        raise CorpusError(
            f"corpus {corpus.name!r} gives only {available} windows of {spec.seq_len} tokens "
            f"(stride {stride}); {count} were asked for"
        )
    starts = spec.offset + stride * torch.arange(count)
    windows = ids[starts[:, None] + torch.arange(body)[None, :]]
    if spec.bos == "every":
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise ConfigError("bos='every' needs a tokenizer with a BOS token")
        windows = torch.cat([torch.full((count, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def model_bos(tokenizer: Any) -> BosMode:
    """The window start a model expects: "every" (each window opens with BOS) when its tokenizer puts BOS at the
    start of a text, as Gemma's and Llama-2's do; "tokenizer" otherwise (SmolLM2 adds none)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return "tokenizer"
    ids = tokenizer("a", verbose=False)["input_ids"]
    return "every" if ids[:1] == [bos] else "tokenizer"
