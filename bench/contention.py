"""Slowdown under CPU contention: `actlab bench decode` and a short `actlab profile`, on a quiet machine and
beside one competing CPU-bound process, with the old thread policy (every core, spinning OpenMP waits) and with
actlab's (`actlab.threads`: the idle cores only, sleeping waits under contention).

    python bench/contention.py [--model smollm2-135m] [--tokens 8192] [--reps 3]

Prints a table of times and their ratio to the quiet machine, writes bench/results/contention.json. With one
competitor on C cores, a fair share of the machine predicts a ratio of C / (C - 1) for work that uses every
core (2 on this project's 2-core machines). Needs an otherwise quiet machine: it refuses to start when other
processes keep more than a third of a core busy (pause long jobs with kill -STOP first).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD = {"OMP_NUM_THREADS": str(os.cpu_count())}  # round 1: torch's default (every core), default OpenMP waits


def actlab(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "ACTLAB_THREADS")}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "actlab.cli", *args], capture_output=True, text=True,
                         env={**full, **env})
    if out.returncode:
        raise SystemExit(f"actlab {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - t, out.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens the profile reads")
    ap.add_argument("--reps", type=int, default=1, help="repetitions of each measurement (median reported; "
                    "`bench decode` itself reports the median of 3)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "contention.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from actlab.threads import busy_cores

    busy = busy_cores(1.0)
    if busy is not None and busy > 0.33:
        raise SystemExit(f"{busy:.2f} cores are busy already: measure on a quiet machine")
    work = Path(tempfile.mkdtemp(prefix="actlab-contention-"))
    recipe = work / "recipe.json"
    actlab(["sparsify", "--model", args.model, "--method", "magnitude", "--sparsity", "0.5", "--windows", "1",
            "--calib-windows", "4", "--seq-len", "512", "--save", str(recipe)], OLD)

    def decode(env):
        _, out = actlab(["bench", "decode", "--model", args.model, "--recipe", str(recipe), "--reps", "3",
                         "--tokens", "32", "--json"], env)
        result = json.loads(out)
        return 1.0 / result["dense_tok_s"], 1.0 / result["sparse_tok_s"]  # seconds per token

    def profile(env):
        seconds, _ = actlab(["profile", "--model", args.model, "--tokens", str(args.tokens), "--seq-len", "1024",
                             "--out", str(work / "run"), "--overwrite"], env)
        return seconds

    rows = {}
    competitor = None
    try:
        for load in ("quiet", "one competitor"):
            if load != "quiet":
                competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(1.0)
            for policy, env in (("every core (round 1)", OLD), ("actlab.threads", {})):
                dense, sparse, prof = [], [], []
                for _ in range(args.reps):
                    d, s = decode(env)
                    dense.append(d)
                    sparse.append(s)
                    prof.append(profile(env))
                rows[(load, policy)] = {"decode_dense_s_per_token": statistics.median(dense),
                                        "decode_sparse_s_per_token": statistics.median(sparse),
                                        "profile_s": statistics.median(prof)}
                print(load, policy, rows[(load, policy)], flush=True)
    finally:
        if competitor is not None:
            competitor.kill()
    table = []
    lines = ["| policy | measurement | quiet | one competitor | ratio (fair share: "
             f"{os.cpu_count() / max(1, os.cpu_count() - 1):.1f}) |", "|---|---|---|---|---|"]
    labels = {"decode_dense_s_per_token": "decode, dense engine (ms/token)",
              "decode_sparse_s_per_token": "decode, 50% sparse engine (ms/token)", "profile_s": "profile (s)"}
    for policy in ("every core (round 1)", "actlab.threads"):
        for what in labels:
            quiet, busy_value = rows[("quiet", policy)][what], rows[("one competitor", policy)][what]
            table.append({"policy": policy, "measurement": what, "quiet": quiet, "contended": busy_value,
                          "ratio": busy_value / quiet})
            unit = 1e3 if "token" in what else 1.0
            lines.append(f"| {policy} | {labels[what]} | {quiet * unit:.2f} | {busy_value * unit:.2f} | "
                         f"{busy_value / quiet:.2f} |")
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "tokens": args.tokens, "reps": args.reps,
                                          "cores": os.cpu_count(), "rows": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
