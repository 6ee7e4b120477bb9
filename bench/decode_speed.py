"""Decode speed by sparsity: HF generate vs the engine dense vs the engine sparse, per model and level.

    python bench/decode_speed.py [--models smollm2-135m gemma3-270m] [--levels 0.25 0.4 0.5 0.65]
                                 [--method loss-aware] [--tokens 64] [--reps 5]

Each (model, level) is one `actlab bench decode` measurement (greedy, batch 1, one process, interleaved
repetitions, medians). Prints a Markdown table and writes bench/results/decode_speed.json (resumable: rows
already there are kept unless --fresh).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from actlab.fsutil import atomic_write_json
from actlab.jobs.bench import BEST_METHOD, bench_decode


def table(rows: list[dict]) -> str:
    lines = ["| model | method | target | achieved | HF tok/s | dense tok/s | sparse tok/s | sparse/dense | "
             "sparse/HF | dense/HF | ceiling |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['target_sparsity']:.2f} | {r['achieved_sparsity']:.3f} | "
                     f"{r['hf_tok_s']:.2f} | {r['dense_tok_s']:.2f} | {r['sparse_tok_s']:.2f} | "
                     f"{r['sparse_over_dense']:.2f} | {r['sparse_over_hf']:.2f} | {r['dense_over_hf']:.2f} | "
                     f"{r['ceiling']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--levels", nargs="+", type=float, default=[0.25, 0.4, 0.5, 0.65])
    ap.add_argument("--method", default=BEST_METHOD)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="bench/results/decode_speed.json")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()

    out = Path(args.out)
    done = {} if args.fresh or not out.exists() else json.loads(out.read_text())
    for model in args.models:
        for level in args.levels:
            key = f"{model}|{args.method}|{level:.2f}|{args.tokens}"
            if key in done:
                continue
            done[key] = bench_decode(model, method=args.method, sparsity=level, tokens=args.tokens, reps=args.reps,
                                     log=lambda m: print(m, file=sys.stderr))
            atomic_write_json(out, done)
            print(table([done[key]]).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(list(done.values())))


if __name__ == "__main__":
    main()
