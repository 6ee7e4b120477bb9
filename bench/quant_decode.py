"""Quantized decoding, side by side in one run: actlab's engine in float32, int8, int4 and int4 + 50% activation
sparsity against llama.cpp (llama-cpp-python) in F32, Q8_0, Q4_0 and Q4_1 on the same model, the same thread
count and the same WikiText-2 windows: decode tokens/s, weight bytes read per token, perplexity.

    python bench/quant_decode.py --model smollm2-135m --threads 2 --json bench/results/quant_decode_smollm2.json

actlab's int8 is RTN 8-bit symmetric in groups of 32, int4 RTN 4-bit asymmetric in groups of 32 (SmolLM2's
source grid: Q4_1), the sparse row loss-aware activation sparsity at 50% composed with that int4 recipe; each
recipe is run by the engine (greedy, batch 1) and its perplexity taken through hooks on the same windows.
llama.cpp's models: actlab's F32 GGUF export, quantized by llama.cpp's own `llama_model_quantize` (default
tensor types: its output / tied embedding matrix gets Q6_K, or Q8_0 where rows are not multiples of 256).
llama.cpp spins its threads like OpenMP: nothing
else may run meanwhile (the script warns when cores are busy). Decode speed: the median over --reps runs of
--tokens greedy tokens after a 32-token prompt, timed after the prompt's evaluation.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from gguf_llama_cpp import llama_cpp_python  # noqa: E402
from peers import busy_cores_warning, decode_bench_parser, pin_threads, run_peer, write_results  # noqa: E402

LLAMA_TYPES = {"F32": 0, "Q8_0": 7, "Q4_0": 2, "Q4_1": 3}

RUNNER = r"""
import ctypes, json, statistics, sys, time
import numpy as np
import llama_cpp
from llama_cpp import Llama

spec = json.loads(sys.argv[1])
out = {}
source = spec["f32"]
paths = {}
for name, ftype in spec["types"].items():  # every quantization before any model is loaded
    path = paths[name] = source if ftype == 0 else source.replace(".gguf", f"-{name}.gguf")
    if ftype:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = spec["threads"]
        rc = llama_cpp.llama_model_quantize(source.encode(), path.encode(), ctypes.byref(params))
        assert rc == 0, f"llama_model_quantize {name}: {rc}"
for name, path in paths.items():
    print(name, file=sys.stderr, flush=True)
    # one token per evaluation: llama-cpp-python 0.3.36's batched matmul on quantized types segfaults on this
    # machine's CPU (AVX-512 / AMX); a decode step is one token anyway, and the logits are the same
    batch = spec["ctx"] if name == "F32" else 1
    llm = Llama(model_path=path, n_ctx=spec["ctx"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
                n_batch=batch, n_ubatch=batch, logits_all=True, verbose=False)
    nll, count = 0.0, 0
    for window in spec["windows"]:
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= float(logp[np.arange(len(window) - 1), window[1:]].sum())
        count += len(window) - 1
    rates, tokens = [], None
    for rep in range(spec["reps"] + 1):
        llm.reset()
        llm.eval(spec["prompt"])
        seq = []
        t = time.perf_counter()
        token = int(np.argmax(llm.scores[len(spec["prompt"]) - 1]))
        for _ in range(spec["tokens"] - 1):
            seq.append(token)
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        seq.append(token)
        if rep:
            rates.append((spec["tokens"] - 1) / (time.perf_counter() - t))
        tokens = seq
    out[name] = {"tok_s": statistics.median(rates), "runs": rates, "ppl": float(np.exp(nll / count)),
                 "path": path, "tokens": tokens}
    del llm
print(json.dumps(out))
"""


def gguf_bytes(path: str) -> dict:
    """Bytes a decode step reads from a GGUF (every tensor but the token embedding, of which it reads one row,
    unless the embedding is also the output matrix) and the tensor types in it."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: int(t.n_bytes) for t in reader.tensors}
    read = sum(b for n, b in tensors.items() if n != "token_embd.weight" or "output.weight" not in tensors)
    return {"bytes_per_token": read, "file_mb": Path(path).stat().st_size / 1e6,
            "types": sorted({t.tensor_type.name for t in reader.tensors})}


def main() -> None:
    ap = decode_bench_parser(__doc__, reps=5)
    ap.add_argument("--sparsity", type=float, default=0.5)
    args = ap.parse_args()
    pin_threads(args.threads)
    from actlab.engine.decode import DecodeEngine
    from actlab.engine.reference import prompt_ids
    from actlab.eval.perplexity import perplexity
    from actlab.export import export_gguf
    from actlab.jobs import setup
    from actlab.transforms import compose
    from actlab.transforms.quant import NoCalibration, get_method
    from actlab.transforms.sparsity import CalibrationData, calibrate

    quiet = lambda *_: None  # noqa: E731
    lm = setup.model(args.model, quiet)
    _, windows = setup.eval_windows(lm, "wikitext2:test", args.seq_len, args.windows)
    ids = prompt_ids(lm)
    bare = NoCalibration(lm)
    int8 = get_method("rtn", bits=8, group=32, symmetric=True).calibrate(bare)
    int4 = get_method("rtn", bits=4, group=32).calibrate(bare)
    data = CalibrationData.from_corpus(lm, None, seq_len=512, windows=8)
    sparse = calibrate("loss-aware", data, args.sparsity)
    configs = {"fp32": None, "int8": int8, "int4": int4, f"int4+{args.sparsity:.0%} sparse": compose(sparse, int4)}

    work = Path(tempfile.mkdtemp(prefix="actlab-quant-decode-"))
    export_gguf(lm, None, work / "model.gguf")
    busy = busy_cores_warning()
    spec = {"f32": str(work / "model.gguf"), "types": LLAMA_TYPES, "threads": args.threads, "ctx": args.seq_len,
            "windows": windows.tolist(), "prompt": ids, "tokens": args.tokens, "reps": args.reps}
    llama = json.loads(run_peer(llama_cpp_python(), RUNNER, json.dumps(spec)).strip().splitlines()[-1])

    rows = []
    engines = {name: DecodeEngine(lm, r, max_len=len(ids) + args.tokens + 1) for name, r in configs.items()}
    rates: dict[str, list[float]] = {name: [] for name in configs}
    tokens: dict[str, list[int]] = {}
    for rep in range(args.reps + 1):  # interleaved repetitions, the first a warm-up
        for name, engine in engines.items():
            engine.reset_counters()
            stats = engine.generate(ids, args.tokens)
            tokens[name] = stats.tokens
            if rep:
                rates[name].append((args.tokens - 1) / stats.decode_s)
    for name, recipe in configs.items():
        engine = engines[name]
        sparsity = engine.achieved_sparsity() if "sparse" in name else 0.0
        if recipe is None:
            ppl = perplexity(lm, windows, progress=False).ppl
        else:
            from actlab.transforms import attach

            with attach(lm, recipe):
                ppl = perplexity(lm, windows, progress=False).ppl
        rows.append({"system": "actlab", "config": name, "tok_s": statistics.median(rates[name]), "runs": rates[name],
                     "bytes_per_token": engine.weight_bytes_per_token(sparsity), "ppl": ppl,
                     "achieved_sparsity": sparsity, "tokens": tokens[name]})
    for name, r in llama.items():
        rows.append({"system": "llama.cpp", "config": name, **r, **gguf_bytes(r["path"])})
    q4 = next(r for r in rows if r["system"] == "llama.cpp" and r["config"] == "Q4_0")
    lines = [f"## {args.model}: decode at batch 1, {args.threads} threads ({args.tokens} tokens, median of "
             f"{args.reps}); perplexity on {args.windows} x {args.seq_len} WikiText-2 test tokens", "",
             "| system | weights | tok/s | × llama.cpp Q4_0 | MB read / token | ppl | Δppl vs Q4_0 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['config']} | {r['tok_s']:.1f} | {r['tok_s'] / q4['tok_s']:.2f} | "
                     f"{r['bytes_per_token'] / 1e6:.1f} | {r['ppl']:.3f} | {r['ppl'] / q4['ppl'] - 1:+.1%} |")
    print("\n".join(lines), flush=True)
    if args.json:
        write_results(args.json, {"model": args.model, "threads": args.threads, "tokens": args.tokens,
                                  "reps": args.reps, "windows": args.windows, "seq_len": args.seq_len,
                                  "busy_cores_before": busy, "rows": rows, "table": "\n".join(lines)})


if __name__ == "__main__":
    main()
