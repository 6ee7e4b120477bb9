"""The data-parallel profile's speed-up: the same profile on 1 process x 1 thread and on 2 processes x 1 thread
(`actlab profile --nproc 2`, torch.distributed on gloo), one run, medians of `--reps`.

Each configuration runs the full profile (`--windows` windows) and a one-round profile (one window per process:
start-up, model load, report); the difference is the time the windows themselves took. Prints the table and
writes JSON. Time nothing else on the machine meanwhile.

    python bench/distributed_profile.py --model smollm2-135m --windows 16 --json bench/results/distributed_profile.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peers import write_results


def timed_profile(model: str, data: str, seq_len: int, windows: int, nproc: int, out: Path) -> float:
    args = [sys.executable, "-m", "actlab", "profile", "--model", model, "--data", data, "--seq-len", str(seq_len),
            "--tokens", str(seq_len * windows), "--out", str(out), "--overwrite", "--nproc", str(nproc)]
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"profile failed ({' '.join(args)}):\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="wikitext2:valid")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        timed_profile(args.model, args.data, args.seq_len, 1, 1, Path(tmp) / "warm")  # model cache, kernels
        for nproc in (1, 2):
            full = [timed_profile(args.model, args.data, args.seq_len, args.windows, nproc, Path(tmp) / "r")
                    for _ in range(args.reps)]
            short = [timed_profile(args.model, args.data, args.seq_len, nproc, nproc, Path(tmp) / "s")
                     for _ in range(args.reps)]
            total, startup = statistics.median(full), statistics.median(short)
            rows.append({"processes": nproc, "threads_each": 1, "total_s": total, "one_round_s": startup,
                         "windows_s": total - startup, "full_all_s": full, "one_round_all_s": short})
    one, two = rows
    ratio_total, ratio_windows = two["total_s"] / one["total_s"], two["windows_s"] / one["windows_s"]
    print(f"\n{args.model}: profile of {args.windows} windows x {args.seq_len} tokens of {args.data}, "
          f"median of {args.reps}\n")
    print("|processes x threads|total s|one round s|windows s|")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"|{r['processes']} x 1|{r['total_s']:.1f}|{r['one_round_s']:.1f}|{r['windows_s']:.1f}|")
    print(f"\ntime ratio 2 x 1 / 1 x 1: total {ratio_total:.3f}, the windows alone {ratio_windows:.3f} (goal <= 0.55)")
    if args.json:
        write_results(Path(args.json), {"model": args.model, "data": args.data, "seq_len": args.seq_len,
                                        "windows": args.windows, "reps": args.reps, "rows": rows,
                                        "ratio_total": ratio_total, "ratio_windows": ratio_windows})


if __name__ == "__main__":
    main()
