"""The one setup every job shares: a model, evaluation windows, a calibration set."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from actlab.calib import CalibrationSet
from actlab.data import Corpus, WindowSpec, load_corpus, make_windows
from actlab.models import LoadedModel, load_model
from actlab.parallel import World, all_gather, shard


def model(spec: str, log: Callable[[str], None] = print) -> LoadedModel:
    return load_model(spec, log_fn=log)


def eval_windows(lm: LoadedModel, data: str | None, seq_len: int, windows: int | None,
                 role: str = "eval") -> tuple[Corpus, torch.Tensor]:
    """The evaluation corpus (its evaluation part by default) cut into `windows` windows of `seq_len` tokens."""
    corpus = load_corpus(data, role=role)  # type: ignore[arg-type]
    spec = WindowSpec(seq_len=seq_len, num_windows=windows)
    return corpus, make_windows(lm.tokenizer, corpus, spec, lm.max_context)


def calibration(lm: LoadedModel, data: str | None, seq_len: int, windows: int, **kw: Any) -> CalibrationSet:
    """The calibration set on the calibration part of `data` (see actlab.data.sources for roles)."""
    return CalibrationSet.from_corpus(lm, data, seq_len=seq_len, windows=windows, **kw)


def keep_recipe(recipe: Any, lm: LoadedModel, save: str, world: World) -> Any:
    """Validate a calibrated recipe for `lm`, save it (rank 0 of a data-parallel job), and return its cost."""
    from actlab.transforms.compose import cost_of, validate

    validate(recipe, lm)
    if world.main:
        recipe.save(save)
    return cost_of(lm, recipe)


def sharded(windows: torch.Tensor, world: World, run: Callable[[torch.Tensor], list]) -> list:
    """`run` over this rank's block of `windows` (a list per window), every rank's lists joined in window order."""
    mine = shard(len(windows), world)
    local = run(windows[mine.start:mine.stop]) if len(mine) else []
    return [v for part in all_gather(local, world) for v in part]


def window_ppl(nlls: list[float]) -> float:
    import math

    return math.exp(sum(nlls) / len(nlls))


def perplexity_with_and_without(lm: LoadedModel, recipe: Any, data: str | None, seq_len: int, windows: int,
                                progress: bool = True, world: World | None = None) -> dict[str, Any]:
    """Held-out perplexity of the plain model and with `recipe` attached, on the same windows (data parallel:
    each rank its block)."""
    from actlab.eval.perplexity import perplexity
    from actlab.transforms import attach

    world = world or World()
    corpus, ids = eval_windows(lm, data, seq_len, windows)
    show = progress and world.main
    dense = sharded(ids, world, lambda w: perplexity(lm, w, progress=show).window_nll)
    with attach(lm, recipe):
        mine = sharded(ids, world, lambda w: perplexity(lm, w, progress=show,
                                                        description=f"perplexity, {recipe.describe()}").window_nll)
    return {"dense_ppl": window_ppl(dense), "eval_data": corpus.name, "ppl": window_ppl(mine)}
