"""Decode speed: HF generate vs the engine dense vs the engine sparse, in one process, median of repetitions."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from actlab.calib import CalibrationSet
from actlab.engine.decode import DecodeEngine
from actlab.engine.reference import FirstStepClock, hf_generate, prompt_ids
from actlab.errors import ConfigError
from actlab.models import load_model
from actlab.transforms import Recipe, load_recipe
from actlab.transforms.sparsity import HOOKS_ONLY, METHODS, calibrate, check_target, get_method

BEST_METHOD = "loss-aware"


def bench_decode(model: str, method: str | None = None, sparsity: float = 0.5, recipe_path: str | None = None,
                 tokens: int = 64, reps: int = 5, calib: str | None = None, calib_windows: int = 8,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    if reps < 1 or tokens < 2:
        raise ConfigError("need at least 1 repetition and 2 tokens")
    method = method or BEST_METHOD
    if recipe_path is None:
        check_target(sparsity)
        get_method(method)
        if method in HOOKS_ONLY:
            raise ConfigError(f"the decode engine cannot run {method} recipes (low-rank paths or prompt-chosen cores); "
                              f"engine methods: {', '.join(m for m in METHODS if m not in HOOKS_ONLY)}")
    recipe = load_recipe(recipe_path) if recipe_path is not None else None
    lm = load_model(model, log_fn=log)
    lm.adapter.refuse_moe("the decode engine")  # before any calibration
    ids = prompt_ids(lm)
    if lm.max_context and len(ids) + tokens + 1 > lm.max_context:
        raise ConfigError(f"--tokens {tokens}: the {len(ids)}-token prompt and {tokens} new tokens exceed the model's "
                          f"context of {lm.max_context}")
    if recipe is not None:
        from actlab.engine.plan import EnginePlan

        EnginePlan.lower(lm, recipe)  # what the engine cannot run is refused before anything is timed
    from actlab.threads import busy_cores

    busy = busy_cores(0.5)
    if busy is not None and busy > 0.5:
        log(f"warning: {busy:.1f} of {os.cpu_count()} cores are busy with other work: these timings are not "
            "reliable (pause other jobs, or compare only ratios taken in one run)")
    torch.manual_seed(0)
    if recipe is None:
        log(f"calibrating {method} to {sparsity:.0%} on {calib or 'python-docs'} ...")
        data = CalibrationSet.from_corpus(lm, calib, seq_len=512, windows=calib_windows)
        recipe = calibrate(method, data, sparsity)
    dense, sparse = DecodeEngine(lm, max_len=len(ids) + tokens + 1), DecodeEngine(lm, recipe, len(ids) + tokens + 1)
    # decode phase: the tokens after the first, timed from the end of the prompt's prefill (what a
    # per-token decode speed means); end to end: all new tokens over the whole call, prefill included
    runs: dict[str, list[float]] = {"hf": [], "dense": [], "sparse": []}
    runs_e2e: dict[str, list[float]] = {"hf": [], "dense": [], "sparse": []}
    outputs: dict[str, list[int]] = {}

    def run_hf():
        clock = FirstStepClock()
        t = time.perf_counter()
        outputs["hf"] = hf_generate(lm, ids, tokens, clock)
        end = time.perf_counter()
        return end - t, end - clock.t

    def run_engine(name, engine):
        t = time.perf_counter()
        stats = engine.generate(ids, tokens)
        outputs[name] = stats.tokens
        return time.perf_counter() - t, stats.decode_s

    # one warm-up round (kernel build, allocator, caches), then interleaved repetitions
    for rep in range(reps + 1):
        sparse.reset_counters()
        for name, fn in (("hf", run_hf), ("dense", lambda: run_engine("dense", dense)),
                         ("sparse", lambda: run_engine("sparse", sparse))):
            total_s, decode_s = fn()
            if rep > 0:
                runs[name].append((tokens - 1) / decode_s)
                runs_e2e[name].append(tokens / total_s)
    achieved = sparse.achieved_sparsity()
    head = sparse.head.bytes_read()
    linear_fp32 = dense.weight_bytes_per_token() - head
    fp32_head = lm.adapter.lm_head.weight.numel() * 4
    result = {
        "model": lm.name, "recipe": recipe.describe(), "method": recipe.method,
        "target_sparsity": getattr(recipe, "target", None), "tokens": tokens, "reps": reps,
        "threads": torch.get_num_threads(), "prompt_tokens": len(ids),
        "hf_tok_s": statistics.median(runs["hf"]), "dense_tok_s": statistics.median(runs["dense"]),
        "sparse_tok_s": statistics.median(runs["sparse"]), "achieved_sparsity": achieved,
        # memory-bound ceilings of sparse over dense for the achieved sparsity: with this engine's head
        # (int8 + exact re-scoring) and with a float32 head (the convention of the 1.65x figure)
        "ceiling": dense.weight_bytes_per_token() / sparse.weight_bytes_per_token(achieved),
        "ceiling_fp32_head": (linear_fp32 + fp32_head) / (sparse.weight_bytes_per_token(achieved) - head + fp32_head),
        "hf_e2e_tok_s": statistics.median(runs_e2e["hf"]), "dense_e2e_tok_s": statistics.median(runs_e2e["dense"]),
        "sparse_e2e_tok_s": statistics.median(runs_e2e["sparse"]),
        "dense_matches_hf": outputs["dense"] == outputs["hf"],
        "runs_tok_s": runs, "runs_e2e_tok_s": runs_e2e, "busy_cores_before": busy,
    }
    result.update(prefill_speed(lm, recipe, reps=reps))
    result["sparse_over_dense"] = result["sparse_tok_s"] / result["dense_tok_s"]
    result["sparse_over_hf"] = result["sparse_tok_s"] / result["hf_tok_s"]
    result["dense_over_hf"] = result["dense_tok_s"] / result["hf_tok_s"]
    return result


def long_prompt(lm: Any, length: int) -> list[int]:
    """`length` tokens of the evaluation half of the built-in corpus (its text repeated if it is too short)."""
    from actlab.data import load_corpus

    text = load_corpus(None, role="eval").text
    ids: list[int] = []
    while len(ids) < length:
        ids += lm.tokenizer(text[: max(4000, length * 8)], verbose=False)["input_ids"]
    return ids[:length]


def bench_context(model: str, recipe_path: str, contexts: list[int], tokens: int = 32, reps: int = 2,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Decode tokens/s and KV-cache bytes at long contexts, the engine with the full cache against the engine with
    the recipe (a KV recipe's ragged cache), one process: per context, `reps` rounds of a prefill (not timed) and
    `tokens` timed decode steps for each engine in turn; the median step."""
    from actlab.engine.plan import EnginePlan
    from actlab.threads import busy_cores

    if reps < 1 or tokens < 2 or not contexts or min(contexts) < 2:
        raise ConfigError("need at least 1 repetition, 2 tokens and contexts of at least 2 tokens")
    recipe = load_recipe(recipe_path)
    lm = load_model(model, log_fn=log)
    lm.adapter.refuse_moe("the decode engine")
    if lm.max_context and max(contexts) + tokens + 1 > lm.max_context:
        raise ConfigError(f"--context {max(contexts)} and {tokens} new tokens exceed the model's context of "
                          f"{lm.max_context}")
    EnginePlan.lower(lm, recipe)
    busy = busy_cores(0.5)
    if busy is not None and busy > 0.5:
        log(f"warning: {busy:.1f} of {os.cpu_count()} cores are busy with other work: these timings are not reliable")
    rows = []
    for context in contexts:
        ids = long_prompt(lm, context)
        engines = {"full": DecodeEngine(lm, max_len=context + tokens + 1),
                   "recipe": DecodeEngine(lm, recipe, max_len=context + tokens + 1)}
        steps: dict[str, list[float]] = {name: [] for name in engines}
        outputs: dict[str, list[int]] = {}
        for _ in range(reps):
            for name, engine in engines.items():
                token = engine.prefill(ids)
                outputs[name] = [token]
                for pos in range(context, context + tokens - 1):
                    start = time.perf_counter()
                    token = engine.step(token, pos)
                    steps[name].append(time.perf_counter() - start)
                    outputs[name].append(token)
        per_token = lm.adapter.num_kv_heads * lm.adapter.head_dim * 4 * 2
        row = {"context": context, "full_tok_s": 1 / statistics.median(steps["full"]),
               "recipe_tok_s": 1 / statistics.median(steps["recipe"]),
               "full_kv_mb": _held_kv_bytes(engines["full"], context + tokens - 1, per_token) / 1e6,
               "recipe_kv_mb": engines["recipe"].kv_cache_bytes(held=True) / 1e6,
               "recipe_kv_allocated_mb": engines["recipe"].kv_cache_bytes() / 1e6,
               "same_tokens": outputs["full"] == outputs["recipe"]}
        row["speedup"] = row["recipe_tok_s"] / row["full_tok_s"]
        log(f"context {context}: full cache {row['full_tok_s']:.2f} tok/s ({row['full_kv_mb']:.1f} MB), "
            f"{recipe.describe()} {row['recipe_tok_s']:.2f} tok/s ({row['recipe_kv_mb']:.1f} MB): "
            f"{row['speedup']:.2f}x")
        rows.append(row)
        del engines
    return {"model": lm.name, "recipe": recipe.describe(), "tokens": tokens, "reps": reps,
            "threads": torch.get_num_threads(), "busy_cores_before": busy, "contexts": rows}


def _held_kv_bytes(engine: DecodeEngine, end: int, per_token: int) -> int:
    """What the dense engine's cache holds after `end` positions: every position of every layer with attention
    (a sliding-window layer only its window)."""
    return sum(min(end, layer.window or end) for layer in engine.layers if layer.attention) * per_token


PREFILL_TOKENS = 512


def hf_prefill_seconds(model: Any, ids: torch.Tensor, reps: int = 3) -> float:
    """One forward pass over the prompt without a KV cache: the median of `reps`, after a warm-up."""
    times = []
    with torch.no_grad():
        for rep in range(reps + 1):
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            if rep:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def prefill_speed(lm: Any, recipe: Recipe | None, tokens: int = PREFILL_TOKENS, reps: int = 3,
                  dense_s: float | None = None) -> dict[str, Any]:
    """Prefill time of the HF model over a `tokens`-token prompt: dense, and with the recipe's removed blocks and
    sublayers really skipped (skipping_model). Only layer removal changes what HF computes; a recipe without it
    gets the dense time alone (its other parts would run as hooks, which time nothing useful). `dense_s`: a dense
    time taken earlier in the same run, reused."""
    from actlab.transforms.layers import LayerRecipe
    from actlab.transforms.layers.skip import skipping_model

    length = min(tokens, lm.max_context or tokens)
    ids = torch.tensor([prompt_ids(lm, length)], device=lm.device)
    dense_s = dense_s if dense_s is not None else hf_prefill_seconds(lm.model, ids, reps)
    out: dict[str, Any] = {"prefill_tokens": int(ids.shape[1]), "dense_prefill_s": dense_s}
    layers = [r for r in getattr(recipe, "recipes", [recipe]) if isinstance(r, LayerRecipe)]
    if not layers:
        return out
    union = LayerRecipe("prefill", lm.identity.to_dict(), [p for r in layers for p in r.drop],
                        repair={k: v for r in layers for k, v in r.repair.items()})
    try:
        model = skipping_model(lm, union)
    except ConfigError as exc:
        return {**out, "prefill_error": str(exc)}
    out["prefill_s"] = hf_prefill_seconds(model, ids, reps)
    out["prefill_speedup"] = out["dense_prefill_s"] / out["prefill_s"]
    return out


def profile_step(model: str, recipe: Recipe | None, tokens: int = 32, log=print) -> str:
    """Where a decode step's time goes (cProfile of the engine's generate), as text."""
    import cProfile
    import io
    import pstats

    lm = load_model(model, log_fn=log)
    ids = prompt_ids(lm)
    engine = DecodeEngine(lm, recipe, len(ids) + tokens + 1)
    engine.generate(ids, tokens)
    prof = cProfile.Profile()
    prof.enable()
    engine.generate(ids, tokens)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
    return buf.getvalue()
