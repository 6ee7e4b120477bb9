"""The one evaluation harness: the dense model and every recipe, on the same items, every task, with errors.

`evaluate(lm, tasks, columns)` attaches each column's recipe (None: dense) once and scores every task under
it; per-item records are kept, so each recipe's difference to dense comes with the standard error of the
paired per-item differences.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from actlab.data.tasks import LOWER_IS_BETTER, Item, TaskSpec, items
from actlab.errors import ConfigError
from actlab.eval import metrics as M
from actlab.eval.scoring import score_item
from actlab.parallel import World, all_gather, shard
from actlab.progress import track

DENSE = "dense"


@dataclass
class TaskResult:
    task: str
    output_type: str
    version: int
    n: int  # items (windows for perplexity tasks)
    metrics: dict[str, tuple[float, float]]  # metric -> (value, stderr)
    per_item: dict[str, list[float]] = field(repr=False)  # what the metric averages, item by item
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)
    seconds: float = 0.0

    def to_dict(self, with_records: bool = False) -> dict[str, Any]:
        out = {"task": self.task, "output_type": self.output_type, "version": self.version, "n": self.n,
               "metrics": {m: {"value": v, "stderr": s} for m, (v, s) in self.metrics.items()},
               "seconds": self.seconds}
        if with_records:
            out["records"] = self.records
        return out

    @classmethod
    def from_saved(cls, entry: dict[str, Any], records: list[dict[str, Any]]) -> TaskResult:
        """A result written by `to_dict` and its per-item records (what a resumed evaluation reuses)."""
        metrics = {m: (v["value"], v["stderr"]) for m, v in entry["metrics"].items()}
        per_item = {m: [float(r[m]) for r in records] for m in metrics if m != "perplexity"}
        if "perplexity" in metrics:  # what _run pairs: window NLLs, or the negated continuation log-likelihood
            per_item["perplexity"] = [r["nll"] if entry["output_type"] == "perplexity" else -r["loglikelihoods"][0]
                                      for r in records]
        return cls(entry["task"], entry["output_type"], entry["version"], entry["n"], metrics, per_item, records,
                   entry.get("seconds", 0.0))


@dataclass
class Column:
    name: str
    recipe: Any = None  # a Recipe, or None for the dense model
    results: dict[str, TaskResult] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)  # what the recipe's meters saw (e.g. achieved sparsity)
    cost: dict[str, Any] = field(default_factory=dict)
    speed: dict[str, Any] = field(default_factory=dict)


@dataclass
class Evaluation:
    model: dict[str, Any]
    limit: int | None
    columns: list[Column]
    warnings: list[str] = field(default_factory=list)  # e.g. a checkpoint loaded with missing weights

    def difference(self, column: Column, task: str, metric: str) -> tuple[float, float]:
        """(column - dense) on the same items, and its paired standard error."""
        base, mine = self.columns[0].results[task], column.results[task]
        if metric == "perplexity":  # per item NLLs: the paired error of the log ratio, scaled (delta method)
            _, se = M.paired_difference(base.per_item[metric], mine.per_item[metric])
            return mine.metrics[metric][0] - base.metrics[metric][0], mine.metrics[metric][0] * se
        return M.paired_difference(base.per_item[metric], mine.per_item[metric])

    def to_dict(self, with_records: bool = False) -> dict[str, Any]:
        out = {"model": self.model, "limit": self.limit, "columns": [], **({"warnings": self.warnings}
                                                                           if self.warnings else {})}
        for col in self.columns:
            entry = {"name": col.name, "recipe": None if col.recipe is None else col.recipe.describe(),
                     "measured": col.measured, "cost": col.cost, "speed": col.speed,
                     "tasks": {t: r.to_dict(with_records) for t, r in col.results.items()}}
            if col is not self.columns[0]:
                entry["difference"] = {t: {m: dict(zip(("value", "stderr"), self.difference(col, t, m)))
                                           for m in r.metrics} for t, r in col.results.items()}
            out["columns"].append(entry)
        return out

    def table(self) -> str:
        """The results the way lm-evaluation-harness prints them, a value column per model variant and, for each
        recipe, its difference to dense with the paired standard error."""
        cols = self.columns
        head = ["Tasks", "Version", "n", "Metric", ""] + [c.name for c in cols[:1]] + ["±"]
        for c in cols[1:]:
            head += [c.name, "±", f"Δ {c.name}", "±"]
        rows = []
        for task, first in cols[0].results.items():
            for i, metric in enumerate(first.metrics):
                arrow = "↓" if metric in LOWER_IS_BETTER else "↑"
                v, s = first.metrics[metric]
                row = [task if i == 0 else "", str(first.version) if i == 0 else "", str(first.n) if i == 0 else "",
                       metric, arrow, _num(v), _num(s)]
                for c in cols[1:]:
                    cv, cs = c.results[task].metrics[metric]
                    d, ds = self.difference(c, task, metric)
                    row += [_num(cv), _num(cs), ("+" if d >= 0 else "") + _num(d), _num(ds)]
                rows.append(row)
        widths = [max(3, len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(head)]
        right = {1, 2} | {j for j in range(5, len(head))}

        def line(cells):
            return "|" + "|".join((c.rjust(w) if j in right else c.ljust(w)) for j, (c, w) in
                                  enumerate(zip(cells, widths))) + "|"

        sep = "|" + "|".join(("-" * (w - 1) + ":") if j in right else "-" * w for j, w in enumerate(widths)) + "|"
        return "\n".join([line(head), sep, *map(line, rows)])


def _num(x: float) -> str:
    return "nan" if x != x else f"{x:.4f}" if abs(x) < 1e5 else f"{x:.4g}"


# -- running ------------------------------------------------------------------------------------------

def evaluate(lm: Any, tasks: list[TaskSpec], columns: list[Column], limit: int | None = None, progress: bool = True,
             log=print, on_result: Callable[[Column, TaskResult], None] | None = None,
             world: World | None = None) -> Evaluation:
    """Every column on every task. Results already in a column (`column.results`, e.g. loaded from an interrupted
    run) are kept and not recomputed; `on_result(column, result)` is called after each new one (a checkpoint).
    With a distributed `world` (the same call on every rank) each rank scores its block of every task's items
    and every rank gets all per-item records, in item order; `on_result` runs on rank 0 only. A recipe's
    `measured` summary (e.g. achieved sparsity) is rank 0's, over the items it ran."""
    world = world or World()
    from actlab.transforms.compose import cost_of, validate

    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    for col in columns:
        if col.recipe is not None:
            validate(col.recipe, lm)  # every recipe is checked before the first one runs
    prepared = {spec.task: (spec, _prepare(lm, spec, limit)) for spec in tasks}
    for col in columns:
        col.cost = cost_of(lm, col.recipe).to_dict()
    resumed = {col.name: set(col.results) for col in columns}
    _run_shared_documents(lm, prepared, columns, progress and world.main, log, on_result, world)
    for col in columns:
        todo = [name for name in prepared if name not in col.results]
        for name in prepared:
            if name in resumed[col.name]:
                log(f"{col.name}: {name} kept from an earlier run in --out")
        if todo:
            _run_column(lm, col, todo, prepared, progress and world.main, log, on_result, world)
        col.results = {name: col.results[name] for name in prepared}  # the tasks' order, whatever ran first
    return Evaluation(lm.identity.to_dict(), limit, columns, list(lm.provenance.get("warnings", [])))


def _run_column(lm: Any, col: Column, todo: list[str], prepared: dict[str, tuple[TaskSpec, Any]], progress: bool,
                log, on_result, world: World) -> None:
    """The tasks `todo` for one column, its recipe attached once."""
    from actlab.transforms.compose import attach

    with contextlib.ExitStack() as stack:
        attached = stack.enter_context(attach(lm, col.recipe)) if col.recipe is not None else None
        for name in todo:
            spec, data = prepared[name]
            start = time.perf_counter()
            result = _run(lm, spec, data, f"{col.name}: {name}", progress, world)
            result.seconds = time.perf_counter() - start
            col.results[name] = result
            log(f"{col.name}: {name} " + ", ".join(f"{m} {v:.4f}" for m, (v, _) in result.metrics.items()))
            if attached is not None:
                col.measured = {**col.measured, **attached.summary(lm)}  # over the tasks this process ran
            if on_result is not None and world.main:
                on_result(col, result)


def _prepare(lm: Any, spec: TaskSpec, limit: int | None):
    if spec.output_type != "perplexity":
        return items(spec, limit, lm.tokenizer)
    from actlab.data import WindowSpec, load_corpus, make_windows

    corpus = load_corpus(spec.dataset.corpus, role="all")
    seq_len = min(spec.seq_len, lm.max_context or spec.seq_len)  # a shorter model context caps the window
    all_windows = make_windows(lm.tokenizer, corpus, WindowSpec(seq_len=seq_len), lm.max_context)
    return all_windows[:limit] if limit else all_windows


def _run(lm: Any, spec: TaskSpec, data: Any, description: str, progress: bool,
         world: World | None = None) -> TaskResult:
    world = world or World()
    mine = shard(len(data), world)
    if spec.output_type == "perplexity":
        from actlab.eval.perplexity import perplexity

        local = perplexity(lm, data[mine.start:mine.stop], batch_size=1, progress=progress,
                           description=description, chunk=spec.chunk).window_nll if len(mine) else []
        window_nll = [v for part in all_gather(local, world) for v in part]
        ppl, se = M.perplexity_of_nlls(window_nll)
        return TaskResult(spec.task, spec.output_type, spec.version, len(data), {"perplexity": (ppl, se)},
                          {"perplexity": window_nll}, [{"window": i, "nll": v} for i, v in enumerate(window_nll)])
    local = [_record(spec, item, score_item(lm, item))
             for item in track(data[mine.start:mine.stop], total=len(mine), description=description, enabled=progress)]
    records = [r for part in all_gather(local, world) for r in part]
    return _result(spec, records, len(data))


def _result(spec: TaskSpec, records: list[dict[str, Any]], n: int) -> TaskResult:
    per_item = {m: [float(r[m]) for r in records] for m in spec.metrics if m != "perplexity"}
    out = {m: M.mean_stderr(v) for m, v in per_item.items()}
    if "perplexity" in spec.metrics:
        lls = [r["loglikelihoods"][0] for r in records]  # the target continuation's (a loglikelihood task's only)
        per_item["perplexity"] = [-x for x in lls]  # paired differences of NLL
        out["perplexity"] = M.perplexity_of_loglikelihoods(lls)
    ordered = {m: out[m] for m in spec.metrics}
    return TaskResult(spec.task, spec.output_type, spec.version, n, ordered, per_item, records)


def _run_shared_documents(lm: Any, prepared: dict[str, tuple[TaskSpec, Any]], columns: list[Column], progress: bool,
                          log, on_result, world: World) -> None:
    """Tasks with a question after each document, for the columns whose document forward is the dense model's
    (no recipe, or KV recipes only): each document read once for all of them (eval/shared.py)."""
    from actlab.eval.shared import score_shared, shareable

    for name, (spec, data) in prepared.items():
        cols = [c for c in columns if name not in c.results and shareable(c.recipe)]
        if spec.doc_to_question is None or len(cols) < 2:
            continue
        start = time.perf_counter()
        mine = shard(len(data), world)
        local: dict[str, list[dict[str, Any]]] = {c.name: [] for c in cols}
        held = {c.name: [0, 0] for c in cols}
        description = f"{name}: {len(cols)} columns, each document read once"
        for item in track(data[mine.start:mine.stop], total=len(mine), description=description, enabled=progress):
            scores, kept = score_shared(lm, item, [c.recipe for c in cols])
            for col, score, (k, f) in zip(cols, scores, kept):
                local[col.name].append(_record(spec, item, score))
                held[col.name][0] += k
                held[col.name][1] += f
        for col in cols:
            result = _result(spec, [r for part in all_gather(local[col.name], world) for r in part], len(data))
            result.seconds = (time.perf_counter() - start) / len(cols)
            col.results[name] = result
            if held[col.name][1]:
                col.measured = {**col.measured, "kv_kept_fraction": held[col.name][0] / held[col.name][1]}
            log(f"{col.name}: {name} " + ", ".join(f"{m} {v:.4f}" for m, (v, _) in result.metrics.items()))
            if on_result is not None and world.main:
                on_result(col, result)


def _record(spec: TaskSpec, item: Item, scores) -> dict[str, Any]:
    lls = [s.loglikelihood for s in scores]
    record: dict[str, Any] = {"index": item.index, "target": item.target, "loglikelihoods": lls}
    if spec.output_type == "loglikelihood":
        record.update(acc=int(scores[0].greedy))
        return record
    pred = max(range(len(lls)), key=lls.__getitem__)
    record.update(pred=pred, acc=int(pred == item.target))
    if spec.output_type == "multiple_choice":
        norm = [ll / len(c) for ll, c in zip(lls, item.choices)]  # lm-eval: the choice's characters, no delimiter
        pred_norm = max(range(len(norm)), key=norm.__getitem__)
        record.update(pred_norm=pred_norm, acc_norm=int(pred_norm == item.target))
    return record
