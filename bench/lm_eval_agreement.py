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
the agreement table; it writes bench/results/lm_eval_agreement.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "bench" / ".venvs" / "lm-eval"
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
LM_EVAL_SPEC = "lm-eval[hf]>=0.4,<0.5"
TASKS = "arc_easy,arc_challenge,piqa,hellaswag,lambada"


def lm_eval_python() -> Path:
    python = VENV / "bin" / "python"
    if not (VENV / ".installed").is_file():
        print(f"creating {VENV} with {TORCH_SPEC} and {LM_EVAL_SPEC} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        for spec in (TORCH_SPEC, LM_EVAL_SPEC):
            subprocess.run([str(python), "-m", "pip", "install", "-q", spec], check=True)
        (VENV / ".installed").touch()
    return python


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
           "--log_samples", "--output_path", str(out), "--batch_size", "4", "--device", "cpu"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(cmd, check=True, env=env)
    samples = {}
    for task in tasks:
        files = sorted(out.rglob(f"samples_actlab_{task}_*.jsonl"))
        rows = [json.loads(line) for line in files[-1].read_text().splitlines()]
        samples[task] = {r["doc_id"]: r for r in rows}
    results = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())["results"]
    return samples, {t: results[f"actlab_{t}"] for t in tasks}


def compare(task: str, spec, ours, theirs: dict, summary: dict) -> list[dict]:
    out = []
    lls, acc, acc_norm = [], 0, 0
    for record in ours.records:
        other = theirs[record["index"]]
        their_lls = [float(r[0]) for r in other["filtered_resps"]]
        lls.append(max(abs(a - b) for a, b in zip(record["loglikelihoods"], their_lls)))
        if spec.output_type == "loglikelihood":
            acc += int(record["acc"] == int(other["acc"]))
        else:
            acc += int(record["acc"] == int(other["acc"]))
            acc_norm += int(record["acc_norm"] == int(other["acc_norm"]))
    n = len(ours.records)
    agree = {"acc": acc, "acc_norm": acc_norm, "perplexity": None}
    for metric in ours.metrics:
        value, stderr = ours.metrics[metric]
        out.append({"task": task, "metric": metric, "items": n, "agree": agree[metric], "max_abs_ll_diff": max(lls),
                    "actlab": value, "actlab_stderr": stderr, "lm_eval": summary.get(f"{metric},none"),
                    "lm_eval_stderr": summary.get(f"{metric}_stderr,none")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lm_eval_agreement.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import actlab
    from actlab.data.tasks import load_task, read_docs
    from actlab.eval.harness import DENSE, Column, evaluate
    from actlab.models import cache

    python = lm_eval_python()
    names = args.tasks.split(",")
    specs = {t: load_task(t) for t in names}
    work = Path(tempfile.mkdtemp(prefix="actlab-lmeval-"))
    for t, spec in specs.items():  # the same documents for both tools, outside the repository
        data = work / f"{t}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in read_docs(spec, args.limit)))
        (work / f"actlab_{t}.yaml").write_text(lm_eval_yaml(spec, data))
    table = []
    for model in args.models.split(","):
        lm = actlab.load_model(model)
        model_dir = cache.entry_path(model) if cache.valid_entry(model) else Path(lm.provenance["path"])
        ours = evaluate(lm, list(specs.values()), [Column(DENSE)], limit=args.limit, progress=False).columns[0]
        theirs, summaries = run_lm_eval(python, model_dir, names, work, work / f"out-{model}", args.limit)
        for t in names:
            rows = compare(t, specs[t], ours.results[t], theirs[t], summaries[t])
            for row in rows:
                row["model"] = model
            table += rows
    lines = ["| model | task | metric | items | items that agree | max abs Δ log-likelihood | actlab | lm-eval |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['task']} | {r['metric']} | {r['items']} | "
              f"{'-' if r['agree'] is None else r['agree']} | {r['max_abs_ll_diff']:.2e} | "
              f"{r['actlab']:.4f} ± {r['actlab_stderr']:.4f} | {r['lm_eval']:.4f} ± {r['lm_eval_stderr']:.4f} |"
              for r in table]
    print("\n".join(lines))
    result = {"limit": args.limit, "lm_eval": LM_EVAL_SPEC, "rows": table}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
