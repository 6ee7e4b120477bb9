"""Do actlab's steering vectors equal repeng's? The same contrastive pairs and layers through both tools, the
cosine of the two directions per layer (the goal: >= 0.999 at every layer).

    python bench/repeng_agreement.py [--models smollm2-135m,gemma3-270m] [--pairs builtin:sentiment:train]
                                     [--methods pca-diff,pca-center]

repeng runs in its own virtual environment (bench/.venvs/repeng); it loads the same cached Hugging Face
directory actlab loads. repeng reads hidden_states[k + 1] (the output of layer k) at the last token; its last
layer is the state after the final norm, so the layers compared are 1 .. n-2 (repeng's default range without its
last). repeng pads its batches on the side its tokenizer pads, which can shift positions, so it runs one text at a
time here; actlab pads on the right, which a causal model never sees.
Prints a table, writes bench/results/repeng_agreement.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from peers import TORCH_SPEC, peer_python, run_peer, write_results

ROOT = Path(__file__).resolve().parents[1]

RUNNER = r"""
import json, sys
import numpy as np, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from repeng import ControlVector, DatasetEntry
path, spec_file, out_file = sys.argv[1:4]
spec = json.load(open(spec_file))
tokenizer = AutoTokenizer.from_pretrained(path)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
dataset = [DatasetEntry(positive=p, negative=n) for p, n in spec["pairs"]]
out = {}
for method in spec["methods"]:
    vector = ControlVector.train(model, tokenizer, dataset, hidden_layers=spec["layers"], batch_size=1,
                                 method=method.replace("-", "_"))
    out[method] = {str(k): np.asarray(v, dtype=np.float64).tolist() for k, v in vector.directions.items()}
json.dump(out, open(out_file, "w"))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--pairs", default="builtin:sentiment:train")
    ap.add_argument("--methods", default="pca-diff,pca-center")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "repeng_agreement.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    import actlab
    from actlab.data.pairs import load_contrast_pairs
    from actlab.jobs.steer import train_vectors
    from actlab.models import cache

    python = peer_python("repeng", TORCH_SPEC, "repeng==0.4.0")
    pairs = load_contrast_pairs(args.pairs)
    methods = args.methods.split(",")
    work = Path(tempfile.mkdtemp(prefix="actlab-repeng-"))
    rows = []
    for model in args.models.split(","):
        lm = actlab.load_model(model)
        layers = list(range(1, lm.adapter.num_layers - 1))
        spec = work / "spec.json"
        spec.write_text(json.dumps({"pairs": [[p.positive, p.negative] for p in pairs], "layers": layers,
                                    "methods": methods}))
        theirs_file = work / f"{model}.json"
        run_peer(python, RUNNER, str(cache.entry_path(model)), str(spec), str(theirs_file))
        theirs = json.loads(theirs_file.read_text())
        for method in methods:
            ours, _ = train_vectors(lm, pairs, layers, method)
            cosines = {i: float(torch.nn.functional.cosine_similarity(
                ours[i].double(), torch.tensor(theirs[method][str(i)], dtype=torch.float64), dim=0))
                for i in layers}
            rows.append({"model": model, "method": method, "pairs": len(pairs), "layers": f"{layers[0]}-{layers[-1]}",
                         "min_cosine": min(cosines.values()),
                         "median_cosine": float(torch.tensor(list(cosines.values())).median()),
                         "per_layer": cosines})
    print(f"pairs: {args.pairs} ({len(pairs)})\n")
    print("| model | method | layers | min cosine | median cosine | all >= 0.999 |")
    print("|---|---|---|---:|---:|---|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['layers']} | {r['min_cosine']:.6f} | {r['median_cosine']:.6f} | "
              f"{'yes' if r['min_cosine'] >= 0.999 else 'no'} |")
    write_results(args.out, {"pairs": args.pairs, "rows": rows})


if __name__ == "__main__":
    main()
