"""The eval job: a model, zero or more recipes, a list of tasks -> one table, JSON, and a comparison page."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from actlab.data.tasks import TaskSpec, load_task
from actlab.errors import ConfigError
from actlab.eval.harness import DENSE, Column, Evaluation, evaluate
from actlab.jobs import setup
from actlab.transforms import load_recipe

DEFAULT_TASKS = "wikitext2,lambada,arc_easy,arc_challenge,piqa,hellaswag"


def parse_tasks(tasks: str) -> list[TaskSpec]:
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise ConfigError("--tasks names no task")
    specs = [load_task(n) for n in names]
    seen = [s.task for s in specs]
    if len(set(seen)) != len(seen):
        raise ConfigError(f"a task is listed twice: {', '.join(sorted({t for t in seen if seen.count(t) > 1}))}")
    return specs


def column_names(paths: list[str]) -> list[str]:
    """A short unique column name per recipe file (its file name without suffix)."""
    names = []
    for p in paths:
        stem = Path(p).name.split(".")[0] or p
        name, k = stem, 2
        while name in names or name == DENSE:
            name, k = f"{stem}-{k}", k + 1
        names.append(name)
    return names


def eval_job(model: str, recipes: list[str], tasks: str = DEFAULT_TASKS, limit: int | None = None,
             out: str | None = None, speed: bool = False, progress: bool = True,
             log: Callable[[str], None] = print) -> Evaluation:
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    specs = parse_tasks(tasks)  # every bad task and recipe file fails before the model loads
    loaded = [load_recipe(p) for p in recipes]
    target = _output_dir(out) if out else None
    lm = setup.model(model, log)
    columns = [Column(DENSE)] + [Column(name, r) for name, r in zip(column_names(recipes), loaded)]
    result = evaluate(lm, specs, columns, limit=limit, progress=progress, log=log)
    if speed:
        for col in columns:
            col.speed = decode_speed(lm, col.recipe, log)
    if target is not None:
        from actlab.report.compare import write_comparison

        write_comparison(result, target)
    return result


def decode_speed(lm: Any, recipe: Any, log: Callable[[str], None], tokens: int = 64, reps: int = 3) -> dict[str, Any]:
    """Decode tokens/s (median) and memory of the engine under `recipe`, or why the engine cannot run it."""
    import resource
    import statistics

    from actlab.engine import DecodeEngine
    from actlab.engine.reference import prompt_ids

    ids = prompt_ids(lm)
    try:
        engine = DecodeEngine(lm, recipe, max_len=len(ids) + tokens + 1)
    except ConfigError as exc:
        log(f"speed: {exc}")
        return {"error": str(exc)}
    engine.generate(ids, tokens)  # warm-up
    rates = [engine.generate(ids, tokens).decode_tok_s for _ in range(reps)]
    return {"decode_tok_s": statistics.median(rates), "tokens": tokens, "reps": reps,
            "engine_mb": engine.memory_bytes() / 1e6,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _output_dir(out: str) -> Path:
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is a file, not a directory")
    if path.is_dir() and any(path.iterdir()):
        raise ConfigError(f"--out {path} is not empty; choose a new directory")
    return path
