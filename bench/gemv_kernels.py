"""Which technology for the engine's batch-1 GEMV kernels? Time the candidates on decode-like traffic.

    python bench/gemv_kernels.py [--rows 1536] [--cols 576] [--matrices 64] [--reps 7] [--json]

Decoding streams every weight matrix once per token, so one pass here runs each candidate over `matrices`
distinct [rows, cols] matrices (the SmolLM2-135M MLP shape by default; 64 of them = 226 MB, far beyond the
caches). Reported: median ms per pass over `reps` interleaved repetitions, effective GB/s of weight bytes
*read*, and the ratio to the C++ dense kernel. Candidates:
  torch.mv                  dense, W [out, in]
  C++ dense_gemv            dense, W [out, in], OpenMP over output rows
  index_select + mv         input-sparse the torch way: gather the kept rows of Wt, then GEMV
  C++ sparse_gemv           input-sparse, fused: score, mask and accumulate kept rows of Wt in place
at input sparsities 0.25 / 0.5 / 0.65 / 0.9 (random inputs, thresholds at the matching quantile).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from actlab.engine.kernels import TorchKernels, load_kernels

SPARSITIES = (0.25, 0.5, 0.65, 0.9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1536)
    ap.add_argument("--cols", type=int, default=576)
    ap.add_argument("--matrices", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default="bench/results/gemv_kernels.json")
    args = ap.parse_args()

    native = load_kernels()
    if isinstance(native, TorchKernels):
        raise SystemExit("the C++ extension could not be built here; nothing to compare")
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(args.rows, args.cols, generator=g) for _ in range(args.matrices)]
    wts = [w.t().contiguous() for w in ws]  # input-sparse layout: Wt [in, out], kept rows contiguous
    x = torch.randn(args.cols, generator=g)
    none = torch.empty(0)

    cases = {"torch.mv": lambda: [torch.mv(w, x) for w in ws],
             "C++ dense_gemv": lambda: [native.dense_gemv(w, x) for w in ws]}
    for s in SPARSITIES:
        cutoff = float(x.abs().quantile(s))
        keep = torch.nonzero(x.abs() > cutoff).flatten()
        cases[f"index_select+mv @{s:.2f}"] = lambda keep=keep: [wt.index_select(0, keep).t().mv(x[keep]) for wt in wts]
        cases[f"C++ sparse_gemv @{s:.2f}"] = lambda c=cutoff: [native.sparse_gemv(wt, x, none, c) for wt in wts]

    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()  # warm up
    for _ in range(args.reps):  # interleaved, so drift in machine load hits every candidate alike
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    full_bytes = args.matrices * args.rows * args.cols * 4
    dense_ms = statistics.median(times["C++ dense_gemv"]) * 1e3
    rows = []
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        kept = 1.0 - float(name.split("@")[1]) if "@" in name else 1.0
        rows.append({"kernel": name, "ms_per_pass": ms, "gb_s_read": full_bytes * kept / ms / 1e6,
                     "vs_dense_cpp": ms / dense_ms})
    result = {"rows": args.rows, "cols": args.cols, "matrices": args.matrices, "reps": args.reps,
              "threads": torch.get_num_threads(), "weight_mb": full_bytes / 1e6, "kernels": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.matrices} x [{args.rows}, {args.cols}] float32 ({full_bytes / 1e6:.0f} MB), "
          f"{torch.get_num_threads()} threads, median of {args.reps}")
    print(f"{'kernel':<26}{'ms/pass':>10}{'GB/s read':>11}{'x C++ dense':>13}")
    for r in rows:
        print(f"{r['kernel']:<26}{r['ms_per_pass']:>10.2f}{r['gb_s_read']:>11.2f}{r['vs_dense_cpp']:>13.2f}")


if __name__ == "__main__":
    main()
