"""Head roles measured on constructed inputs: induction and retrieval (copy-paste) scores per layer x head.

Neither role shows in ordinary text often enough to be read off a corpus, so both are measured on probes built
deterministically from the model's own vocabulary and the built-in corpus (the same probes for every run of a
model, so runs merge):

- induction (Olsson et al. 2022): a random token sequence x_1..x_n repeated once after BOS; the score of a head
  is the mean attention from each token of the repeat to the token that followed its first occurrence (the
  query at the repeat's position of x_j to the key of x_{j+1}), over j and probes;
- retrieval (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality"): a haystack of
  real text holding a needle (a cue phrase followed by NEEDLE_TOKENS random tokens) at a depth that varies
  across probes, and at the end the cue again followed by the needle, teacher-forced. At every position whose
  next token is needle token j, a head scores a hit when its most-attended key is needle token j in the
  haystack and the model's top prediction is that token (it copies it); the score is hits over needle tokens.

The scores are sums over the probes, which are the same for every run of a model: runs merge by keeping one
copy (the "max" rule). `run_probes` runs them through the probe's exact
attention rows (every query: the probes are short); the profile job calls it once per run.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from actlab.probe.sites import Site
from actlab.probe.stats.base import BatchInfo, Statistic, TableContext

INDUCTION_PROBES, INDUCTION_LENGTH = 8, 48
RETRIEVAL_PROBES, RETRIEVAL_CONTEXT, NEEDLE_TOKENS = 8, 384, 8
CUE = " The secret sequence is:"


class HeadRoles(Statistic):
    name = "head_roles"
    # every run of a model measures the same probes: a merge keeps one copy (max of two equal sums, or of a sum
    # and a run's zeros), so a merged run holds what one pass would
    rules = {f: "max" for f in ("induction", "induction_n", "retrieval", "retrieval_n", "copied")}

    def __init__(self, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self._plan: dict[str, Any] | None = None  # the probe batch being observed: what to read from it
        self._sums: dict[str, dict[str, torch.Tensor]] = {}  # this run's probe sums, while they run

    def settings(self):
        return {"num_heads": self.num_heads, "probes": [INDUCTION_PROBES, INDUCTION_LENGTH, RETRIEVAL_PROBES,
                                                        RETRIEVAL_CONTEXT, NEEDLE_TOKENS, CUE]}

    def accepts(self, site: Site) -> bool:
        return False  # the corpus stream is not read: `run_probes` feeds the probes itself

    def allocate(self, sites, adapter, batch_size, seq_len):
        h, f64 = self.num_heads, torch.float64
        shapes = {"induction": (h,), "induction_n": (1,), "retrieval": (h,), "retrieval_n": (1,), "copied": (1,)}
        for layer in range(adapter.num_layers):
            self.acc.setdefault(f"L{layer}", self.empty_fields({k: (v, f64, 0.0) for k, v in shapes.items()}))

    def measured(self) -> bool:
        return any(float(f["induction_n"].sum()) > 0 for f in self.acc.values())

    # -- probes ------------------------------------------------------------------------------------
    def run_probes(self, lm: Any) -> None:
        """Build the probes for `lm` and add their scores (once per run: a run that has them skips)."""
        from actlab.probe import Probe

        self._begin(lm.adapter)
        induction, retrieval = induction_probes(lm), retrieval_probes(lm)
        sites = [f"L{i}.attn_probs" for i in range(lm.adapter.num_layers)]
        with Probe(lm, sites, self._deliver, query_stride=1), torch.no_grad():
            for kind, probes in (("induction", induction), ("retrieval", retrieval)):
                for probe in probes:
                    self._plan = {"kind": kind, **probe}
                    out = lm.model(input_ids=probe["ids"][None].to(lm.device), use_cache=False)
                    if kind == "retrieval":
                        self._count_copies(out.logits[0].float().cpu())
        self._end()

    def _begin(self, adapter: Any) -> None:
        self.allocate([], adapter, 1, 0)
        self._sums = {key: {name: torch.zeros_like(t) for name, t in fields.items()}
                      for key, fields in self.acc.items()}

    def _end(self) -> None:
        self._plan = None
        for key, sums in self._sums.items():  # summed over this run's probes; kept once by the merge rule
            self.merge_key(self.acc[key], sums)
        self._sums = {}

    def _deliver(self, site: Site, x: torch.Tensor) -> None:
        plan = self._plan
        probs = x[0].float().cpu()  # [H, T, T]
        if plan["kind"] == "induction":
            q, k = plan["queries"], plan["keys"]
            self._add(site.layer, induction=probs[:, q, k].double().sum(-1), induction_n=float(len(q)))
        else:
            plan.setdefault("attended", {})[site.layer] = probs[:, plan["queries"]].argmax(-1)  # [H, answers]

    def _count_copies(self, logits: torch.Tensor) -> None:
        plan = self._plan
        copied = logits[plan["queries"]].argmax(-1) == plan["answers"]  # the model predicts the needle token
        for layer, attended in plan.get("attended", {}).items():
            hits = (attended == plan["keys"][None]) & copied[None]
            self._add(layer, retrieval=hits.double().sum(-1), retrieval_n=float(len(plan["queries"])),
                      copied=float(copied.sum()))

    def _add(self, layer: int, **fields: Any) -> None:
        for name, value in fields.items():
            self._sums[f"L{layer}"][name] += value

    def update(self, site: Site, x: torch.Tensor, batch: BatchInfo) -> None:  # never routed (accepts nothing)
        raise AssertionError("head roles read their own probes")

    def tables(self, ctx: TableContext) -> dict[str, pd.DataFrame]:
        rows = []
        for key, f in sorted(self.acc.items(), key=lambda kv: int(kv[0][1:])):
            n_ind, n_ret = float(f["induction_n"].sum()), float(f["retrieval_n"].sum())
            if n_ind == 0:
                continue
            for h in range(self.num_heads):
                rows.append({"layer": int(key[1:]), "head": h, "induction_score": float(f["induction"][h]) / n_ind,
                             "retrieval_score": float(f["retrieval"][h]) / n_ret if n_ret else float("nan"),
                             "copy_accuracy": float(f["copied"].sum()) / n_ret if n_ret else float("nan")})
        return {"head_roles": pd.DataFrame(rows)}


# -- the probes -------------------------------------------------------------------------------------
def _vocabulary(lm: Any) -> torch.Tensor:
    """Ordinary tokens to draw random sequences from: those of the built-in corpus, without special tokens."""
    from actlab.data import load_corpus

    ids = torch.tensor(lm.tokenizer(load_corpus(None, role="eval").text[:20000], verbose=False)["input_ids"])
    special = torch.tensor(sorted(set(lm.tokenizer.all_special_ids)) or [-1])
    return torch.unique(ids[~torch.isin(ids, special)])


def _bos(lm: Any) -> list[int]:
    """BOS first where the model's tokenizer puts it at the start of a text (the profile's own convention)."""
    from actlab.data.windows import model_bos

    return [lm.tokenizer.bos_token_id] if model_bos(lm.tokenizer) == "every" else []


def induction_probes(lm: Any, count: int = INDUCTION_PROBES, length: int = INDUCTION_LENGTH,
                     seed: int = 0) -> list[dict[str, Any]]:
    """[BOS] x_1..x_n x_1..x_n; queries: the repeat's x_j (j < n), keys: the first x_{j+1}."""
    vocab = _vocabulary(lm)
    g = torch.Generator().manual_seed(seed)
    start = len(_bos(lm))
    out = []
    for _ in range(count):
        x = vocab[torch.randperm(len(vocab), generator=g)[:length]]  # distinct: one earlier occurrence each
        ids = torch.tensor(_bos(lm) + x.tolist() * 2)
        j = torch.arange(length - 1)
        out.append({"ids": ids, "queries": start + length + j, "keys": start + j + 1})
    return out


def retrieval_probes(lm: Any, count: int = RETRIEVAL_PROBES, context: int = RETRIEVAL_CONTEXT,
                     needle: int = NEEDLE_TOKENS, seed: int = 1) -> list[dict[str, Any]]:
    """Haystack with CUE + needle at a depth from 10% to 80%, then CUE + needle teacher-forced; queries: the
    positions whose next token is a needle token, keys: that token's position in the haystack."""
    from actlab.data import load_corpus

    vocab = _vocabulary(lm)
    g = torch.Generator().manual_seed(seed)
    text = lm.tokenizer(load_corpus(None, role="eval").text[:40000], verbose=False)["input_ids"]
    cue = lm.tokenizer(CUE, add_special_tokens=False)["input_ids"]
    bos = _bos(lm)
    hay_len = max(context - len(bos) - 2 * (len(cue) + needle), 16)
    out = []
    for i in range(count):
        offset = (i * 997) % max(len(text) - hay_len, 1)
        hay = [t for t in text[offset:offset + hay_len] if t not in lm.tokenizer.all_special_ids]
        secret = vocab[torch.randperm(len(vocab), generator=g)[:needle]].tolist()
        depth = int(len(hay) * (0.1 + 0.7 * i / max(count - 1, 1)))
        head = bos + hay[:depth] + cue
        ids = head + secret + hay[depth:] + cue + secret
        answer_start = len(ids) - needle
        out.append({"ids": torch.tensor(ids), "queries": torch.arange(answer_start - 1, len(ids) - 1),
                    "keys": torch.arange(len(head), len(head) + needle), "answers": torch.tensor(secret)})
    return out
