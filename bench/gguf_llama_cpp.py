"""Does llama.cpp run what `actlab export --format gguf` writes? Greedy tokens of llama.cpp (through
llama-cpp-python) against actlab's (HF generate on the same float32 weights), on the same prompt tokens.

    python bench/gguf_llama_cpp.py [--models smollm2-135m,gemma3-270m] [--tokens 32] [--recipe R]
    python bench/gguf_llama_cpp.py --models smollm2-135m --control-vector happy.json   # steering in llama.cpp

llama-cpp-python is installed in its own virtual environment (bench/.venvs/llama-cpp, built from source on first
use; never an actlab dependency). The prompt is tokenized by both tools and the token ids compared; llama.cpp
then continues the same ids greedily (top-k 1). Prints a table, writes bench/results/gguf_llama_cpp.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from peers import peer_python, run_peer

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The history of the city begins in the early middle ages, when"

RUNNER = r"""
import json, sys
from llama_cpp import Llama
path, prompt, ids, tokens, cvec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
# one token per evaluation: llama-cpp-python 0.3.36's batched matmul on quantized types segfaults on an
# AVX-512 / AMX CPU (the prompt is a few tokens; the logits are the same)
llm = Llama(model_path=path, n_ctx=512, n_threads=2, n_batch=1, n_ubatch=1, verbose=False)
if cvec:  # as llama.cpp's common loader does: direction.{il} -> row il - 1 of an [n_layer - 1, n_embd] buffer
    import ctypes
    import gguf, llama_cpp
    import numpy as np
    n_embd, n_layer = llm.n_embd(), llama_cpp.llama_model_n_layer(llm.model)
    buf = np.zeros((n_layer - 1, n_embd), dtype=np.float32)
    for tensor in gguf.GGUFReader(cvec).tensors:
        il = int(tensor.name.split(".")[1])
        buf[il - 1] += np.asarray(tensor.data, dtype=np.float32).reshape(-1)
    data = buf.reshape(-1)
    rc = llama_cpp.llama_set_adapter_cvec(llm.ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), data.size,
                                          n_embd, 1, n_layer - 1)
    assert rc == 0, f"llama_set_adapter_cvec returned {rc}"
own = llm.tokenize(prompt.encode(), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token") == "true")
out = []
for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
    out.append(int(token))
    if len(out) == tokens:
        break
print(json.dumps({"tokens": out, "prompt_ids": own}))
"""


def llama_cpp_python() -> Path:
    return peer_python("llama-cpp", "llama-cpp-python", "numpy", note=", llama.cpp builds from source: minutes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--recipe", default=None, help="export with this recipe (one that folds into weights)")
    ap.add_argument("--control-vector", default=None,
                    help="a steering recipe: exported as a control-vector GGUF that llama.cpp applies to the dense "
                         "model, against actlab with the recipe attached")
    ap.add_argument("--out", default=None, help="default bench/results/gguf_llama_cpp.json (gguf_control_vector.json "
                                                "with --control-vector)")
    args = ap.parse_args()
    if args.recipe and args.control_vector:
        ap.error("--recipe folds a recipe into the model GGUF, --control-vector steers the dense one: give one")
    args.out = args.out or str(ROOT / "bench" / "results" / ("gguf_control_vector.json" if args.control_vector
                                                              else "gguf_llama_cpp.json"))
    sys.path.insert(0, str(ROOT / "src"))
    import actlab
    from actlab.engine.reference import hf_generate
    from actlab.export import export_gguf
    from actlab.transforms import attach, load_recipe

    python = llama_cpp_python()
    rows = []
    work = Path(tempfile.mkdtemp(prefix="actlab-gguf-"))
    for model in args.models.split(","):
        lm = actlab.load_model(model)
        recipe = load_recipe(args.control_vector or args.recipe) if args.control_vector or args.recipe else None
        path, cvec = work / f"{model}.gguf", ""
        export_gguf(lm, None if args.control_vector else recipe, path)  # a control vector steers the dense model
        if args.control_vector:
            cvec = str(work / f"{model}-cvec.gguf")
            export_gguf(lm, recipe, cvec)
        ids = lm.tokenizer(PROMPT)["input_ids"]
        if recipe is not None:
            with attach(lm, recipe):
                ours = hf_generate(lm, ids, args.tokens)
        else:
            ours = hf_generate(lm, ids, args.tokens)
        out = run_peer(python, RUNNER, str(path), PROMPT, json.dumps(ids), str(args.tokens), cvec)
        theirs = json.loads(out.strip().splitlines()[-1])
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs["tokens"])) if a != b), len(ours))
        rows.append({"model": model, "gguf_mb": path.stat().st_size / 1e6,
                     "prompt_ids_equal": theirs["prompt_ids"] == ids, "tokens": args.tokens, "equal_prefix": same,
                     "actlab": ours, "llama_cpp": theirs["tokens"], "text_actlab": lm.tokenizer.decode(ours),
                     "text_llama_cpp": lm.tokenizer.decode(theirs["tokens"])})
        print(rows[-1], flush=True)
    lines = ["| model | GGUF MB | prompt tokenized alike | greedy tokens equal |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['gguf_mb']:.0f} | {r['prompt_ids_equal']} | {r['equal_prefix']} of {r['tokens']} |"
              for r in rows]
    print("\n".join(lines))
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
