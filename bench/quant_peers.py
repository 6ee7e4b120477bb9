"""Weight quantization against the PyTorch peers, in one run: optimum-quanto (qint8 / qint4 weights) and torchao
(int8 weight-only / int4 weight-only) on CPU, beside actlab's RTN int8 / int4 recipes, on the same model, the same
thread count and the same WikiText-2 windows: perplexity, and greedy decode tokens/s through HF `generate` for the
peers (what their users run) and through actlab's engine for actlab.

    python bench/quant_peers.py --model smollm2-135m --threads 2 --json bench/results/quant_peers_smollm2.json

Each peer runs in its own virtual environment (bench/.venvs/quant-peers: the same torch and transformers as
actlab, plus optimum-quanto and torchao) on the float32 Hugging Face directory actlab's loader cached; a setting a
peer cannot run on this CPU is reported with its error, not left out. actlab's int8 is RTN 8-bit symmetric and its
int4 RTN 4-bit asymmetric, both in groups of --group (quanto's and torchao's int4 group size is set to the same);
int8 in the peers is per output channel, their only int8 form. Nothing else may run meanwhile: torch's OpenMP
threads spin like llama.cpp's (the script warns when cores are busy).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from peers import (  # noqa: E402
    TORCH_SPEC,
    busy_cores_warning,
    decode_bench_parser,
    peer_python,
    pin_threads,
    run_peer,
    write_results,
)

RUNNER = r"""
import json, statistics, sys, time, traceback
import torch
from transformers import AutoModelForCausalLM, LogitsProcessorList

spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
windows = torch.tensor(spec["windows"])
prompt = torch.tensor([spec["prompt"]])


class FirstStepClock:  # notes when generate finished the prefill
    def __init__(self):
        self.t = None

    def __call__(self, input_ids, scores):
        if self.t is None:
            self.t = time.perf_counter()
        return scores


def quanto(bits):
    from optimum.quanto import freeze, qint4, qint8, quantize
    def make(model):
        quantize(model, weights=qint8 if bits == 8 else qint4)
        freeze(model)
    return make


def torchao(bits):
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    def make(model):
        quantize_(model, Int8WeightOnlyConfig() if bits == 8 else Int4WeightOnlyConfig(group_size=spec["group"]))
    return make


def weight_bytes(model):
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        parts = tensor.__tensor_flatten__()[0] if hasattr(tensor, "__tensor_flatten__") else None
        pieces = [getattr(tensor, p) for p in parts] if parts else [tensor]
        for piece in pieces:
            inner = piece.__tensor_flatten__()[0] if hasattr(piece, "__tensor_flatten__") else None
            for leaf in ([getattr(piece, p) for p in inner] if inner else [piece]):
                if leaf.data_ptr() not in seen:
                    seen.add(leaf.data_ptr())
                    total += leaf.numel() * leaf.element_size()
    return total


settings = {"quanto qint8": quanto(8), "quanto qint4": quanto(4), "torchao int8 weight-only": torchao(8),
            f"torchao int4 weight-only g{spec['group']}": torchao(4)}
out = {}
for name, make in settings.items():
    print(name, file=sys.stderr, flush=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
        make(model)
        with torch.no_grad():
            nll, count = 0.0, 0
            for window in windows:
                logits = model(window[None]).logits[0, :-1].double()
                nll += float(torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum"))
                count += len(window) - 1
            rates, tokens = [], None
            for rep in range(spec["reps"] + 1):  # decode rate: after the prefill (the first logits processor call)
                clock = FirstStepClock()
                seq = model.generate(prompt, max_new_tokens=spec["tokens"], min_new_tokens=spec["tokens"],
                                     do_sample=False, logits_processor=LogitsProcessorList([clock]))
                if rep:
                    rates.append((spec["tokens"] - 1) / (time.perf_counter() - clock.t))
                tokens = seq[0, prompt.shape[1]:].tolist()
        out[name] = {"tok_s": statistics.median(rates), "runs": rates, "weight_bytes": weight_bytes(model),
                     "ppl": float(torch.exp(torch.tensor(nll / count))), "tokens": tokens}
    except Exception as exc:
        out[name] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                     "trace": traceback.format_exc()[-1500:]}
print(json.dumps(out))
"""


def peers_python() -> Path:
    import transformers

    return peer_python("quant-peers", TORCH_SPEC, f"transformers=={transformers.__version__}", "optimum-quanto",
                       "torchao", note="; torch from local disk")


def main() -> None:
    ap = decode_bench_parser(__doc__, reps=3)
    ap.add_argument("--group", type=int, default=64)
    args = ap.parse_args()
    pin_threads(args.threads)
    from actlab.engine.decode import DecodeEngine
    from actlab.engine.reference import FirstStepClock, hf_generate, prompt_ids
    from actlab.eval.perplexity import perplexity
    from actlab.jobs import setup
    from actlab.transforms import attach
    from actlab.transforms.quant import NoCalibration, get_method

    lm = setup.model(args.model, lambda *_: None)
    directory = lm.provenance.get("cache_entry") or lm.provenance.get("path")
    if directory is None:
        raise SystemExit(f"{args.model} has no Hugging Face directory for the peers to load")
    _, windows = setup.eval_windows(lm, "wikitext2:test", args.seq_len, args.windows)
    ids = prompt_ids(lm)
    bare = NoCalibration(lm)
    configs = {"fp32": None, f"rtn int8 g{args.group} sym": get_method("rtn", bits=8, group=args.group,
                                                                        symmetric=True).calibrate(bare),
               f"rtn int4 g{args.group}": get_method("rtn", bits=4, group=args.group).calibrate(bare)}
    busy = busy_cores_warning()
    spec = {"model": directory, "threads": args.threads, "windows": windows.tolist(), "prompt": ids,
            "tokens": args.tokens, "reps": args.reps, "group": args.group}
    peers = json.loads(run_peer(peers_python(), RUNNER, json.dumps(spec)).strip().splitlines()[-1])

    rows = []
    for name, recipe in configs.items():
        engine = DecodeEngine(lm, recipe, max_len=len(ids) + args.tokens + 1)
        rates = []
        for rep in range(args.reps + 1):
            stats = engine.generate(ids, args.tokens)
            if rep:
                rates.append((args.tokens - 1) / stats.decode_s)
        hf_rates = []
        with attach(lm, recipe) if recipe is not None else contextlib.nullcontext():
            ppl = perplexity(lm, windows, progress=False).ppl
            for rep in range(args.reps + 1):  # the same HF generate the peers are timed with (dequantized weights)
                clock = FirstStepClock()
                hf_generate(lm, ids, args.tokens, clock)
                if rep:
                    hf_rates.append((args.tokens - 1) / (time.perf_counter() - clock.t))
        rows.append({"system": "actlab", "config": name, "tok_s": statistics.median(rates), "runs": rates,
                     "hf_generate_tok_s": statistics.median(hf_rates), "ppl": ppl,
                     "weight_bytes": engine.weight_bytes_per_token(0.0), "tokens": stats.tokens})
    for name, r in peers.items():
        rows.append({"system": name.split()[0], "config": " ".join(name.split()[1:]), **r})
    lines = [f"## {args.model}: weight quantization against the PyTorch peers, {args.threads} threads "
             f"(decode {args.tokens} tokens at batch 1, median of {args.reps}; perplexity on {args.windows} x "
             f"{args.seq_len} WikiText-2 test tokens)", "",
             "| system | weights | ppl | engine tok/s | HF generate tok/s | MB (actlab: read / token; peers: stored) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['system']} | {r['config']} | failed: {r['error']} | | | |")
            continue
        engine_rate = f"{r['tok_s']:.1f}" if r["system"] == "actlab" else "-"
        hf_rate = r.get("hf_generate_tok_s", r["tok_s"])
        lines.append(f"| {r['system']} | {r['config']} | {r['ppl']:.3f} | {engine_rate} | {hf_rate:.1f} | "
                     f"{r['weight_bytes'] / 1e6:.1f} |")
    print("\n".join(lines), flush=True)
    if args.json:
        write_results(args.json, {"model": args.model, "threads": args.threads, "tokens": args.tokens,
                                  "reps": args.reps, "windows": args.windows, "seq_len": args.seq_len,
                                  "group": args.group, "busy_cores_before": busy, "rows": rows,
                                  "table": "\n".join(lines)})


if __name__ == "__main__":
    main()
