"""The eval job: a model, zero or more recipes, a list of tasks -> one table, JSON, and a comparison page."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from actlab import parallel
from actlab.data.tasks import TaskSpec, load_task
from actlab.errors import ConfigError
from actlab.eval.harness import DENSE, Column, Evaluation, TaskResult, evaluate
from actlab.fsutil import atomic_write_json, atomic_write_text
from actlab.jobs import setup
from actlab.transforms import load_recipe

RECIPE_SUFFIXES = (".json", ".yaml", ".yml")
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
    """A short unique column name per recipe file: its file name without the recipe suffix (a budget such as
    `-0.5` in the name stays)."""
    names = []
    for p in paths:
        path = Path(p)
        stem = path.stem if path.suffix.lower() in RECIPE_SUFFIXES else path.name
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
    world = parallel.world()  # under torchrun: every rank scores its share of each task, rank 0 writes
    log = log if world.main else (lambda *_: None)
    specs = parse_tasks(tasks)  # every bad task and recipe file fails before the model loads
    loaded = [load_recipe(p) for p in recipes]
    target = parallel.agree(world, lambda: _output_dir(out) if out else None)
    lm = setup.model(model, log)
    columns = [Column(DENSE)] + [Column(name, r) for name, r in zip(column_names(recipes), loaded)]
    checkpoint = None
    if target is not None:
        fingerprint = evaluation_fingerprint(lm, specs, limit, recipes, columns)
        checkpoint = EvalCheckpoint(target, fingerprint)
        kept = parallel.agree(world, lambda: checkpoint.restore(columns, log) or
                              [(c.results, c.measured) for c in columns])
        for col, (results, measured) in zip(columns, kept):  # rank 0 read what an earlier run kept
            col.results, col.measured = results, measured
    result = evaluate(lm, specs, columns, limit=limit, progress=progress, log=log,
                      on_result=checkpoint.save if checkpoint else None, world=world)
    if speed and world.main:
        dense_prefill = None
        for col in columns:
            col.speed = decode_speed(lm, col.recipe, log, dense_prefill_s=dense_prefill)
            dense_prefill = col.speed.get("dense_prefill_s", dense_prefill)
    if target is not None and world.main:
        from actlab.report.compare import write_comparison

        write_comparison(result, target)
    return result


def decode_speed(lm: Any, recipe: Any, log: Callable[[str], None], tokens: int = 64, reps: int = 3,
                 dense_prefill_s: float | None = None) -> dict[str, Any]:
    """Decode tokens/s (median) and memory of the engine under `recipe`, or why the engine cannot run it; and the
    HF prefill time with the recipe's removed layers skipped (jobs.bench.prefill_speed)."""
    import resource
    import statistics

    from actlab.engine import DecodeEngine
    from actlab.engine.reference import prompt_ids
    from actlab.jobs.bench import prefill_speed

    prefill = prefill_speed(lm, recipe, reps=reps, dense_s=dense_prefill_s)
    ids = prompt_ids(lm)
    try:
        engine = DecodeEngine(lm, recipe, max_len=len(ids) + tokens + 1)
    except ConfigError as exc:
        log(f"speed: {exc}")
        return {"error": str(exc), **prefill}
    engine.generate(ids, tokens)  # warm-up
    rates = [engine.generate(ids, tokens).decode_tok_s for _ in range(reps)]
    return {"decode_tok_s": statistics.median(rates), "tokens": tokens, "reps": reps,
            "engine_mb": engine.memory_bytes() / 1e6,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **prefill}


def _output_dir(out: str) -> Path:
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is a file, not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / EvalCheckpoint.FILE).is_file():
        raise ConfigError(f"--out {path} is not empty and holds no actlab evaluation; choose a new directory")
    return path


def evaluation_fingerprint(lm: Any, specs: list[TaskSpec], limit: int | None, recipe_paths: list[str],
                           columns: list[Column]) -> dict[str, Any]:
    """What an evaluation's results depend on: the model and --limit (the same for every cell of a directory),
    each task's version and each column's recipe file bytes (what one cell depends on)."""
    def file_sha(path: str) -> str:
        digest = hashlib.sha256(Path(path).read_bytes())
        sidecar = Path(f"{path}.safetensors")
        if sidecar.is_file():
            digest.update(sidecar.read_bytes())
        return digest.hexdigest()

    return {"model": {"config": lm.identity.config_sha256, "weights": lm.identity.weights_sha256},
            "limit": limit,
            "tasks": {s.task: {"version": s.version, "output_type": s.output_type} for s in specs},
            "recipes": {c.name: file_sha(p) for c, p in zip(columns[1:], recipe_paths)}}


class EvalCheckpoint:
    """An evaluation's `--out` directory as it fills: every finished (column, task) cell is written at once (its
    per-item records and `eval-state.json`). Run again with the same arguments, `actlab eval` continues where it
    stopped; with more recipes or tasks it keeps the finished cells and computes the new ones (the grid grows;
    cells it no longer asks for stay on disk). Refused, naming what differs: another model or --limit, a task of
    another version, a column name whose recipe file changed."""

    FILE = "eval-state.json"

    def __init__(self, out: Path, fingerprint: dict[str, Any]):
        self.out, self.fingerprint = out, fingerprint
        self.state: dict[str, Any] = {**fingerprint, "done": {}, "measured": {}}

    def restore(self, columns: list[Column], log: Callable[[str], None]) -> None:
        path = self.out / self.FILE
        if not path.is_file():
            return
        saved = _current_layout(json.loads(path.read_text()))
        for key in ("model", "limit"):
            if saved[key] != self.fingerprint[key]:
                raise ConfigError(f"--out {self.out} holds an evaluation with other {key}; choose a new directory")
        for key, what in (("tasks", "task {} of another version"), ("recipes", "column {} from another recipe file")):
            clash = sorted(k for k, v in self.fingerprint[key].items() if k in saved[key] and saved[key][k] != v)
            if clash:
                raise ConfigError(f"--out {self.out} holds an evaluation with {what.format(clash[0])}; choose a new "
                                  "directory")
        self.state = {**saved, "tasks": {**saved["tasks"], **self.fingerprint["tasks"]},
                      "recipes": {**saved["recipes"], **self.fingerprint["recipes"]}}
        by_name = {c.name: c for c in columns}
        kept = 0
        for name, tasks in saved["done"].items():
            for task, entry in tasks.items():
                if name not in by_name or task not in self.fingerprint["tasks"]:
                    continue  # a cell of the grid this run does not ask for
                lines = (self.out / "items" / name / f"{task}.jsonl").read_text().splitlines()
                by_name[name].results[task] = TaskResult.from_saved(entry, [json.loads(line) for line in lines])
                kept += 1
            if name in by_name:
                by_name[name].measured = saved["measured"].get(name, {})
        log(f"resuming the evaluation in {self.out}: {kept} (column, task) results kept")

    def save(self, column: Column, result: TaskResult) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in result.records)
        atomic_write_text(self.out / "items" / column.name / f"{result.task}.jsonl", lines)
        self.state["done"].setdefault(column.name, {})[result.task] = result.to_dict()
        self.state["measured"][column.name] = column.measured
        atomic_write_json(self.out / self.FILE, self.state)


def _current_layout(state: dict[str, Any]) -> dict[str, Any]:
    """A state file written before evaluations could grow (one fingerprint with task and column lists) in the
    current layout."""
    if "fingerprint" not in state:
        return state
    old = state.pop("fingerprint")
    return {**state, "model": old["model"], "limit": old["limit"],
            "tasks": {t.pop("task"): t for t in old["tasks"]},
            "recipes": {c["name"]: c["recipe"] for c in old["columns"]}}
