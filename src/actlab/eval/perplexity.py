"""Perplexity over token windows: exp of the mean next-token NLL over the seq_len - 1 predicted tokens."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from actlab.models.loader import LoadedModel
from actlab.progress import track

LOGITS_BUDGET_BYTES = 1 << 30  # batch size is chosen so one batch's logits stay under this


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    seq_len: int
    windows: int
    model: str
    seconds: float
    batch_size: int
    window_nll: list[float] = field(default_factory=list, repr=False)  # mean NLL of each window

    def stderr(self) -> float:
        """Standard error of the perplexity, by the delta method over windows (see eval.metrics)."""
        from actlab.eval.metrics import perplexity_of_nlls

        return perplexity_of_nlls(self.window_nll)[1]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("window_nll")
        return out


def window_nll(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each window (float64), shape [batch]."""
    logits = model(input_ids=batch).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
    return loss.view(batch.shape[0], -1).double().sum(dim=1)


def auto_batch_size(lm: LoadedModel, seq_len: int) -> int:
    per_window = seq_len * lm.adapter.vocab_size * 4 * 2  # logits + their float copy
    return max(1, LOGITS_BUDGET_BYTES // per_window)


def chunked_window_nll(model: torch.nn.Module, window: torch.Tensor, chunk: int) -> torch.Tensor:
    """Summed next-token NLL of one window [1, T] read `chunk` tokens per forward through the KV cache (teacher-
    forced decoding; equal to one forward without a transform of the cache). Attached KV recipes compress after
    every forward, whatever their phase: the cache is held to its budget as it grows."""
    from actlab.models.compat import output_cache, with_cache
    from actlab.transforms.kv.session import running_budget

    total = torch.zeros((), dtype=torch.float64)
    cache = None
    with running_budget():
        for start in range(0, window.shape[1] - 1, chunk):
            out = model(input_ids=window[:, start:start + chunk], use_cache=True,
                        **(with_cache(model, cache) if cache is not None else {}))
            cache = output_cache(out)
            targets = window[0, start + 1:start + chunk + 1]
            logits = out.logits[0, : len(targets)].float()
            total += F.cross_entropy(logits, targets, reduction="sum").double()
    return total.view(1)


@torch.no_grad()
def perplexity(lm: LoadedModel, windows: torch.Tensor, batch_size: int | None = None,
               progress: bool = True, description: str = "perplexity", chunk: int = 0) -> PerplexityResult:
    """`chunk` > 0: each window read that many tokens per forward through the cache (see chunked_window_nll)."""
    if chunk:
        batch_size = 1
    batch_size = batch_size or auto_batch_size(lm, windows.shape[1])
    windows = windows.to(lm.device)
    start = time.perf_counter()
    total = torch.zeros((), dtype=torch.float64)
    per_window: list[float] = []
    batches = range(0, len(windows), batch_size)
    for i in track(batches, total=len(batches), description=description, enabled=progress):
        batch = windows[i : i + batch_size]
        sums = (chunked_window_nll(lm.model, batch, chunk) if chunk else window_nll(lm.model, batch)).cpu()
        total += sums.sum()
        per_window += (sums / (windows.shape[1] - 1)).tolist()
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    nll = float(total) / tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=tokens, seq_len=int(windows.shape[1]),
                            windows=int(windows.shape[0]), model=lm.name, seconds=time.perf_counter() - start,
                            batch_size=batch_size, window_nll=per_window)
