"""Profiler overhead: full-site profile vs bare forward over the same windows, same process; peak RSS vs tokens.

    python bench/profile_overhead.py [--model smollm2-135m] [--windows 8] [--reps 5] [--json]

Prints a table (or one JSON object with --json) and writes the JSON to bench/results/profile_overhead.json,
with the median times of >= 5 interleaved repetitions, their ratio, and the peak RSS of separate child processes
profiling 4k and 64k tokens.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def child_peak_rss(model: str, tokens: int, seq_len: int) -> dict:
    """Profile `tokens` tokens in a fresh process and report its peak RSS (bounded memory check)."""
    code = (
        "import json, resource, sys, tempfile, actlab\n"
        "from actlab.jobs.profile import profile\n"
        f"lm = actlab.load_model({model!r}, log_fn=lambda *a: None)\n"
        "with tempfile.TemporaryDirectory() as d:\n"
        f"    profile({model!r}, 'python-docs', d + '/run', tokens={tokens}, seq_len={seq_len}, progress=False,"
        " log=lambda *a: None, lm=lm)\n"
        "print(json.dumps({'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {"tokens": tokens, **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=None, help="corpus (default python-docs)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rss-tokens", default="4096,65536", help="token counts for the peak-RSS children ('' skips)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default="bench/results/profile_overhead.json", help="where the JSON is written too")
    args = ap.parse_args()

    import actlab
    from actlab.data import WindowSpec, load_corpus, make_windows
    from actlab.probe import Profiler

    lm = actlab.load_model(args.model, log_fn=lambda *a: None)
    windows = make_windows(lm.tokenizer, load_corpus(args.data), WindowSpec(seq_len=args.seq_len,
                                                                            num_windows=args.windows))

    def bare_forward():
        with torch.no_grad():
            for w in windows:
                lm.model(input_ids=w[None], use_cache=False)

    def full_profile():
        Profiler(lm).observe(windows, progress=False)

    bare_forward(), full_profile()  # warm-up: kernels built, caches and allocator warm
    forward_s, profile_s = [], []
    for _ in range(args.reps):  # interleaved, so that machine noise hits both alike
        t = time.perf_counter()
        bare_forward()
        forward_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        full_profile()
        profile_s.append(time.perf_counter() - t)
    result = {
        "model": args.model, "tokens": int(windows.numel()), "windows": args.windows, "seq_len": args.seq_len,
        "sites": len(Profiler(lm).sites), "reps": args.reps, "threads": torch.get_num_threads(),
        "forward_s": statistics.median(forward_s), "profile_s": statistics.median(profile_s),
        "forward_all_s": forward_s, "profile_all_s": profile_s,
    }
    result["ratio"] = result["profile_s"] / result["forward_s"]
    rss = [child_peak_rss(args.model, int(t), args.seq_len) for t in args.rss_tokens.split(",") if t]
    if rss:
        result["peak_rss"] = rss
        result["rss_ratio"] = rss[-1]["peak_rss_mb"] / rss[0]["peak_rss_mb"]
    result["peak_rss_this_process_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    from actlab.fsutil import atomic_write_json

    atomic_write_json(args.out, result)
    if args.json:
        print(json.dumps(result))
        return
    print(f"model {args.model}: {result['tokens']} tokens ({args.windows} x {args.seq_len}), {result['sites']} sites, "
          f"{result['threads']} threads, median of {args.reps}")
    print(f"  bare forward   {result['forward_s']:8.2f} s")
    print(f"  full profile   {result['profile_s']:8.2f} s")
    print(f"  ratio          {result['ratio']:8.3f}")
    for r in rss:
        print(f"  peak RSS, {r['tokens']:>6} tokens profiled: {r['peak_rss_mb']:8.0f} MB")
    if rss:
        print(f"  RSS ratio {rss[-1]['tokens']}/{rss[0]['tokens']} tokens: {result['rss_ratio']:.3f}")


if __name__ == "__main__":
    main()
