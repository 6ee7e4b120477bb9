"""Item-by-item agreement of `actlab eval` with EleutherAI lm-evaluation-harness (0.4.x) on the same items.

    python bench/lm_eval_agreement.py [--models smollm2-135m,gemma3-270m] [--limit 500]
                                      [--tasks arc_easy,arc_challenge,piqa,hellaswag,lambada]

lm-eval runs in its own virtual environment (bench/.venvs/lm-eval, created on first use: the CPU torch of
this machine, then `pip install "lm-eval[hf]>=0.4,<0.5"`); it is never an actlab dependency. Both tools read the
same documents: actlab's task readers write the first --limit items of each task to a temporary jsonl, and
a custom lm-eval task YAML per task points at it with the same prompt, choice and target templates as
actlab's built-in task (lm-eval's own prompts for these tasks). lm-eval loads the model from actlab's cache
directory (a plain HF directory) in float32. For each task the script compares, item by item, the
log-likelihood of every request, the acc and acc_norm (or, for LAMBADA, greedy acc) decisions, and prints
the agreement table; it writes bench/results/lm_eval_agreement.json (rows of other models or limits already
there are kept).

Both sides are long on a CPU (lm-eval ~35 min for SmolLM2 on 500 items), so the work directory (--work,
default bench/.work/lm-eval-agreement) keeps every finished side and a rerun resumes: lm-eval's outputs per
model and limit, and actlab's per-item records. `--actlab MODEL=DIR` takes actlab's side from an existing
`actlab eval --out DIR` of that model and limit instead of recomputing it (the identity and limit are checked).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from peers import TORCH_SPEC, peer_python

ROOT = Path(__file__).resolve().parents[1]
LM_EVAL_SPEC = "lm-eval[hf]>=0.4,<0.5"
TASKS = "arc_easy,arc_challenge,piqa,hellaswag,lambada"


def lm_eval_python() -> Path:
    return peer_python("lm-eval", TORCH_SPEC, LM_EVAL_SPEC)


def lm_eval_yaml(spec, data_file: Path) -> str:
    """A custom lm-eval task with actlab's templates over the same documents."""
    import yaml

    task = {"task": f"actlab_{spec.task}", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data_file)}}, "test_split": "test",
            "output_type": spec.output_type, "doc_to_text": spec.doc_to_text, "doc_to_target": spec.doc_to_target,
            "metric_list": [{"metric": m} for m in spec.metrics]}
    if spec.output_type == "multiple_choice":
        task["doc_to_choice"] = spec.doc_to_choice
        task["target_delimiter"] = spec.target_delimiter
    return yaml.safe_dump(task, sort_keys=False)


def run_lm_eval(python: Path, model_dir: Path, tasks: list[str], include: Path, out: Path, limit: int) -> dict:
    cmd = [str(python), "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
           "--tasks", ",".join(f"actlab_{t}" for t in tasks), "--include_path", str(include), "--limit", str(limit),
           "--log_samples", "--output_path", str(out), "--batch_size", "4", "--device", "cpu",
           "--use_cache", str(out.parent / f"{out.name}-requests")]  # lm-eval's per-request cache: a rerun resumes
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if not sorted(out.rglob("results_*.json")):
        subprocess.run(cmd, check=True, env=env)
    samples = {}
    for task in tasks:
        files = sorted(out.rglob(f"samples_actlab_{task}_*.jsonl"))
        rows = [json.loads(line) for line in files[-1].read_text().splitlines()]
        samples[task] = {r["doc_id"]: r for r in rows}
    results = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())["results"]
    return samples, {t: results[f"actlab_{t}"] for t in tasks}


def compare(task: str, spec, ours: dict, theirs: dict, summary: dict) -> list[dict]:
    """Rows of the agreement table for one task; `ours` is actlab's task entry (metrics and per-item records)."""
    out = []
    lls, acc, acc_norm = [], 0, 0
    for record in ours["records"]:
        other = theirs[record["index"]]
        their_lls = [float(r[0]) for r in other["filtered_resps"]]
        lls.append(max(abs(a - b) for a, b in zip(record["loglikelihoods"], their_lls)))
        acc += int(record["acc"] == int(other["acc"]))
        if spec.output_type == "multiple_choice":
            acc_norm += int(record["acc_norm"] == int(other["acc_norm"]))
    agree = {"acc": acc, "acc_norm": acc_norm, "perplexity": None}
    for metric, entry in ours["metrics"].items():
        out.append({"task": task, "metric": metric, "items": len(ours["records"]), "agree": agree[metric],
                    "max_abs_ll_diff": max(lls), "actlab": entry["value"], "actlab_stderr": entry["stderr"],
                    "lm_eval": summary.get(f"{metric},none"), "lm_eval_stderr": summary.get(f"{metric}_stderr,none")})
    return out


def actlab_side(lm, specs: dict, limit: int, work: Path, given: Path | None) -> dict:
    """actlab's dense results per task ({"metrics", "records"}), from `given` (an `actlab eval --out`
    directory), from an earlier run kept in `work`, or computed now and kept."""
    from actlab.errors import ConfigError
    from actlab.eval.harness import DENSE, Column, evaluate
    from actlab.report.compare import write_comparison

    folder = given or work
    results = folder / "results.json"
    if not results.is_file():
        if given is not None:
            raise ConfigError(f"{given} holds no actlab eval results (results.json)")
        write_comparison(evaluate(lm, list(specs.values()), [Column(DENSE)], limit=limit, progress=False), work)
    saved = json.loads(results.read_text())
    if saved["model"]["weights_sha256"] != lm.identity.weights_sha256 or saved["limit"] != limit:
        raise ConfigError(f"{folder}: another model or --limit ({saved['limit']}) than this comparison's")
    dense = next(c for c in saved["columns"] if c["name"] == DENSE)
    missing = [t for t in specs if t not in dense["tasks"]]
    if missing:
        raise ConfigError(f"{folder} has no dense results for {', '.join(missing)}")
    return {t: {"metrics": dense["tasks"][t]["metrics"],
                "records": [json.loads(line) for line in (folder / "items" / DENSE / f"{t}.jsonl").open()]}
            for t in specs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--work", default=str(ROOT / "bench" / ".work" / "lm-eval-agreement"))
    ap.add_argument("--actlab", action="append", default=[], metavar="MODEL=DIR",
                    help="actlab's side of MODEL from an `actlab eval --out DIR` with the same --limit")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lm_eval_agreement.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import actlab
    from actlab.data.tasks import load_task, read_docs
    from actlab.models import cache

    given = dict(item.split("=", 1) for item in args.actlab)
    python = lm_eval_python()
    names = args.tasks.split(",")
    specs = {t: load_task(t) for t in names}
    work = Path(args.work) / f"limit-{args.limit}"
    work.mkdir(parents=True, exist_ok=True)
    for t, spec in specs.items():  # the same documents for both tools, outside the repository's tracked files
        data = work / f"{t}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in read_docs(spec, args.limit)))
        (work / f"actlab_{t}.yaml").write_text(lm_eval_yaml(spec, data))
    out = Path(args.out)
    previous = json.loads(out.read_text())["rows"] if out.is_file() else []
    table = []
    for model in args.models.split(","):
        lm = actlab.load_model(model)
        model_dir = cache.entry_path(model) if cache.valid_entry(model) else Path(lm.provenance["path"])
        ours = actlab_side(lm, specs, args.limit, work / f"actlab-{model}",
                           Path(given[model]) if model in given else None)
        lm_eval_out = work / f"lm-eval-{model}"
        if not sorted(lm_eval_out.rglob("results_*.json")):  # a finished lm-eval run is kept and reused
            shutil.rmtree(lm_eval_out, ignore_errors=True)
        theirs, summaries = run_lm_eval(python, model_dir, names, work, lm_eval_out, args.limit)
        for t in names:
            for row in compare(t, specs[t], ours[t], theirs[t], summaries[t]):
                table.append({"model": model, "limit": args.limit, **row})
    done = {(r["model"], r["limit"], r["task"], r["metric"]) for r in table}
    rows = [r for r in previous if (r["model"], r.get("limit"), r["task"], r["metric"]) not in done] + table
    lines = ["| model | task | metric | items | items that agree | max abs Δ log-likelihood | actlab | lm-eval |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['task']} | {r['metric']} | {r['items']} | "
              f"{'-' if r['agree'] is None else r['agree']} | {r['max_abs_ll_diff']:.2e} | "
              f"{r['actlab']:.4f} ± {r['actlab_stderr']:.4f} | {r['lm_eval']:.4f} ± {r['lm_eval_stderr']:.4f} |"
              for r in rows]
    print("\n".join(lines))
    out.write_text(json.dumps({"lm_eval": LM_EVAL_SPEC, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
