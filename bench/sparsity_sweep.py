"""Every sparsity method x budget x model on one harness: WikiText-2 perplexity, plus zero-shot accuracy.

    python bench/sparsity_sweep.py [--models smollm2-135m,gemma3-270m] [--levels 0.25,0.4,0.5,0.65]
                                   [--windows 16] [--out bench/results/sparsity_sweep] [--report-only]

Protocol: calibrate on WikiText-2 valid (--calib-windows windows of --seq-len tokens), evaluate on the first
--windows non-overlapping windows of WikiText-2 test; every token is sparsified (decode behaviour; `--positions
last-half`: TEAL's protocol, the first half of each window dense, for prompt-based methods like coreinfer); dense
measured in the same run. Budgets are effective sparsities (parameter-weighted fraction of projection
weight columns skipped per token); every method gets --refine budget-refinement steps. Zero-shot accuracy
(ARC-Easy test, PIQA validation: the first --task-items items of each, in file order) for dense and every
method at --tasks-at.

Resumable: every finished cell is written to <out>/cells.json at once; a rerun skips finished cells. A cell's
key includes a fingerprint of its method file's code (formatting, comments and docstrings excluded), so
changing a method recomputes its rows only. Calibration statistics are cached in the actlab cache. Writes
<out>/sweep.md, sweep.json and sweep.png.
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import inspect
import json
import time
from pathlib import Path

DEFAULT_METHODS = "teal,cats,chess,wina,wina:topk=True,stat-topk,magnitude,loss-aware"
SWEEP_VERSION = 1  # bump when the shared harness changes what a cell means


def parse_method(spec: str) -> tuple[str, dict]:
    name, _, opts = spec.partition(":")
    params = {}
    for kv in filter(None, opts.split(";")):
        k, v = kv.split("=")
        params[k] = v == "True" if v in ("True", "False") else (float(v) if "." in v else int(v))
    return name, params


def code_fingerprint(source: str) -> str:
    """Hash of a module's code, blind to formatting, comments, docstrings and import lines: only what runs
    relabels cells (a name imported from another module after a move is the same code)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if not isinstance(block, list) or not block or not isinstance(block[0], ast.stmt):
                continue
            kept = [s for s in block if not isinstance(s, (ast.Import, ast.ImportFrom))]
            if field == "body" and kept and isinstance(kept[0], ast.Expr) and isinstance(kept[0].value, ast.Constant) \
                    and isinstance(kept[0].value.value, str):
                kept = kept[1:]  # a docstring
            setattr(node, field, kept or [ast.Pass()])
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:10]


@functools.cache  # read once per process: a file edited mid-run must not relabel cells the old code computes
def method_version(name: str) -> str:
    from actlab.transforms.sparsity import METHODS

    return code_fingerprint(inspect.getsource(inspect.getmodule(METHODS[name])))


# Zero-shot scoring version in the task cells' keys. "kv" (round 1): the context once per item, its KV cache
# shared by the choices, acc_norm per character of delimiter + choice. "lmeval" (actlab eval): the same
# computation with lm-eval's continuation tokens and acc_norm per character of the choice alone. Hard
# thresholds make sparse models' scores depend on float rounding, so cells of different scoring code are not
# mixed in one table.
TASK_SCORING = "lmeval"
SWEEP_TASKS = ("arc_easy", "piqa")


def task_key(args, base: str, spec: str, scoring: str = TASK_SCORING) -> str:
    version = "" if spec == "dense" else method_version(parse_method(spec)[0])
    return f"{base}|tasks{args.task_items}{scoring}|{spec}|{version}|{args.tasks_at}"


LEGACY_SCORING = "kv"  # shown, marked, where no cell of the current scoring exists yet


def cell_prefix(args, model: str) -> str:
    base = f"v{SWEEP_VERSION}|{model}|w{args.windows}|c{args.calib_windows}|L{args.seq_len}|r{args.refine}"
    return base if args.positions == "all" else f"{base}|{args.positions}"


def recipe_file(out: Path, model: str, spec: str, level: float) -> Path:
    return out / "recipes" / f"{model}-{spec.replace(':', '_').replace('=', '-')}-{level}.json"


class Cells:
    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        """Re-read under a lock before writing, so that sweeps of different models can run side by side."""
        import fcntl

        from actlab.fsutil import atomic_write_json

        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.is_file():
                self.data = {**json.loads(self.path.read_text()), **self.data}
            self.data[key] = value
            atomic_write_json(self.path, self.data)


def run(args) -> None:
    import actlab
    from actlab.data import WindowSpec, load_corpus, make_windows
    from actlab.data.tasks import load_task
    from actlab.eval import perplexity
    from actlab.eval.harness import Column
    from actlab.eval.harness import evaluate as evaluate_tasks
    from actlab.transforms import load_recipe
    from actlab.transforms.sparsity import CalibrationData, calibrate
    from actlab.transforms.sparsity.harness import evaluate

    out = Path(args.out)
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    cells = Cells(out / "cells.json")
    for spec in args.methods.split(","):
        method_version(parse_method(spec)[0])
    levels = [float(x) for x in args.levels.split(",")]
    tasks = [load_task(name) for name in SWEEP_TASKS] if args.task_items else []

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    for model in args.models.split(","):
        lm = actlab.load_model(model, log_fn=log)
        calib = CalibrationData.from_corpus(lm, "wikitext2", seq_len=args.seq_len, windows=args.calib_windows)
        ev = make_windows(lm.tokenizer, load_corpus("wikitext2", role="eval"),
                          WindowSpec(seq_len=args.seq_len, num_windows=args.windows), lm.max_context)
        base = cell_prefix(args, model)
        if cells.get(f"{base}|dense") is None:
            t0 = time.time()
            cells.put(f"{base}|dense", {"ppl": perplexity(lm, ev, batch_size=1, progress=False).ppl,
                                        "seconds": time.time() - t0})
        log(f"{model} dense ppl {cells.get(f'{base}|dense')['ppl']:.3f}")

        def run_tasks():
            recipes = {spec: recipe_file(out, model, spec, args.tasks_at) for spec in args.methods.split(",")}
            # zero-shot tasks: dense and every method at --tasks-at, on actlab eval's harness
            for spec in ["dense"] + args.methods.split(","):
                key = task_key(args, base, spec)
                if cells.get(key) is not None:
                    continue
                if spec != "dense" and not recipes[spec].exists():
                    cells.put(key, {"error": "no recipe at this level"})
                    continue
                recipe = None if spec == "dense" else load_recipe(recipes[spec])
                column = evaluate_tasks(lm, tasks, [Column(spec, recipe)], limit=args.task_items, progress=False,
                                        log=lambda *a: None).columns[0]
                scores = {t: {"acc": r.metrics["acc"][0], "acc_norm": r.metrics["acc_norm"][0], "items": r.n,
                              "acc_stderr": r.metrics["acc"][1], "acc_norm_stderr": r.metrics["acc_norm"][1],
                              "seconds": r.seconds} for t, r in column.results.items()}
                cells.put(key, scores)
                log(f"{model} tasks {spec}: " + ", ".join(f"{t} {v['acc']:.3f}/{v['acc_norm']:.3f}"
                                                         for t, v in scores.items()))

        # levels outermost, in the order given: `--levels 0.5,...` finishes the headline column first
        for level in levels:
            for spec in args.methods.split(","):
                name, params = parse_method(spec)
                key = f"{base}|{spec}|{method_version(name)}|{level}"
                recipe_path = recipe_file(out, model, spec, level)
                if cells.get(key) is not None and (recipe_path.exists() or "error" in cells.get(key)):
                    continue
                t0 = time.time()
                try:
                    recipe = calibrate(name, calib, level, refine=args.refine, **params)
                    recipe.positions = args.positions
                except actlab.ActlabError as exc:
                    cells.put(key, {"error": str(exc)})
                    log(f"{model} {spec} {level}: {exc}")
                    continue
                t1 = time.time()
                result = evaluate(lm, recipe, ev, progress=False)
                recipe.save(recipe_path)
                cells.put(key, {**result.to_dict(), "predicted": recipe.predicted.get("effective"),
                                "calib_seconds": t1 - t0, "eval_seconds": time.time() - t1})
                log(f"{model} {spec} {level}: ppl {result.sparse_ppl:.3f} achieved {result.achieved_sparsity:.3f}")
            if level == args.tasks_at and args.task_items:
                run_tasks()
    report(args, cells)


def collect(args, cells: Cells) -> dict:
    levels = [float(x) for x in args.levels.split(",")]
    table = {"protocol": {k: getattr(args, k) for k in ("windows", "calib_windows", "seq_len", "refine", "task_items",
                                                         "tasks_at", "levels", "positions")}, "models": {}}
    for model in args.models.split(","):
        base = cell_prefix(args, model)
        dense = cells.get(f"{base}|dense")
        if dense is None:
            continue
        m = {"dense_ppl": dense["ppl"], "methods": {}, "tasks": {}}
        for spec in args.methods.split(","):
            name, _ = parse_method(spec)
            version = method_version(name)
            m["methods"][spec] = {str(level): cells.get(f"{base}|{spec}|{version}|{level}") for level in levels}
        for spec in ["dense"] + args.methods.split(","):
            cell = cells.get(task_key(args, base, spec))
            legacy = cells.get(task_key(args, base, spec, LEGACY_SCORING))
            m["tasks"][spec] = cell if cell is not None or legacy is None else {**legacy, "scoring": LEGACY_SCORING}
        table["models"][model] = m
    return table


def report(args, cells: Cells) -> None:
    from actlab.fsutil import atomic_write_json, atomic_write_text

    out = Path(args.out)
    table = collect(args, cells)
    atomic_write_json(out / "sweep.json", table)
    levels = args.levels.split(",")
    lines = ["# Activation sparsity sweep\n",
             f"Calibration: WikiText-2 valid, {args.calib_windows} x {args.seq_len} tokens; evaluation: first "
             f"{args.windows} x {args.seq_len} tokens of WikiText-2 test; "
             + ("every token sparsified" if args.positions == "all" else "the last half of each window sparsified "
                "(the first half dense, perplexity over all tokens)") + "; budgets are "
             f"effective sparsities (achieved on the evaluation tokens in brackets); {args.refine} refinement "
             "step(s) for every method. Perplexity (increase over dense).\n"]
    for model, m in table["models"].items():
        lines.append(f"\n## {model} (dense ppl {m['dense_ppl']:.3f})\n")
        lines.append("| method | " + " | ".join(f"{float(lv):.0%}" for lv in levels) + " |")
        lines.append("|---|" + "---|" * len(levels))
        for spec, row in m["methods"].items():
            cellstr = []
            for lv in levels:
                c = row.get(str(float(lv)))
                if c is None:
                    cellstr.append("…")
                elif "error" in c:
                    cellstr.append("unreachable")
                else:
                    cellstr.append(f"{c['sparse_ppl']:.2f} ({c['sparse_ppl'] / m['dense_ppl'] - 1:+.1%}) "
                                   f"[{c['achieved_sparsity']:.3f}]")
            lines.append(f"| {spec} | " + " | ".join(cellstr) + " |")
        if args.task_items == 0:
            continue
        lines.append(f"\nZero-shot accuracy at {float(args.tasks_at):.0%} (acc / acc_norm; first {args.task_items} "
                     "items of ARC-Easy test and PIQA validation):\n")
        lines.append("| method | ARC-Easy | PIQA |")
        lines.append("|---|---|---|")
        for spec, t in m["tasks"].items():
            mark = "†" if t is not None and t.get("scoring") == LEGACY_SCORING else ""
            if t is None:
                lines.append(f"| {spec} | … | … |")
            elif "error" in t:
                lines.append(f"| {spec} | {t['error']} | |")
            else:
                lines.append(f"| {spec} | {t['arc_easy']['acc']:.3f} / {t['arc_easy']['acc_norm']:.3f}{mark} | "
                             f"{t['piqa']['acc']:.3f} / {t['piqa']['acc_norm']:.3f}{mark} |")
        if any(t is not None and t.get("scoring") == LEGACY_SCORING for t in m["tasks"].values()):
            lines.append("\n† round 1's scoring: acc_norm per character of the delimiter and the choice (lm-eval: the "
                         "choice alone); acc is the same computation.")
    atomic_write_text(out / "sweep.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(table, out)


def plot(table: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from actlab.fsutil import atomic_path

    models = list(table["models"])
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        m = table["models"][model]
        for spec, row in m["methods"].items():
            pts = [(c["achieved_sparsity"], c["sparse_ppl"]) for c in row.values() if c and "error" not in c]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, "o-", label=spec, lw=2.5 if spec == "loss-aware" else 1.2)
        ax.axhline(m["dense_ppl"], color="k", ls="--", lw=1, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("achieved effective sparsity")
        ax.set_ylabel("WikiText-2 perplexity")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    with atomic_path(out / "sweep.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--levels", default="0.25,0.4,0.5,0.65")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--refine", type=int, default=1)
    ap.add_argument("--task-items", type=int, default=500, help="0: no zero-shot tasks")
    ap.add_argument("--tasks-at", type=float, default=0.5)
    ap.add_argument("--out", default="bench/results/sparsity_sweep")
    ap.add_argument("--positions", default="all", choices=["all", "last-half"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.report_only:
        report(args, Cells(Path(args.out) / "cells.json"))
    else:
        run(args)


if __name__ == "__main__":
    main()
