"""Does `actlab patch` compute what TransformerLens's `patching` module computes? Exact activation patching of
the same clean / corrupted pairs on the same model through both tools; the largest difference of the patched
metric (logit difference of the answer over the wrong token) per table (the goal: <= 1e-4), and the correlation
of attribution patching with exact patching.

    python bench/transformer_lens_agreement.py [--models smollm2-135m] [--pairs builtin:ioi] [--limit 4]

Tables, TransformerLens's function | actlab's site:
    residual stream per layer x position   get_act_patch_resid_pre            | L{i}.resid_in
    MLP output per layer x position         get_act_patch_mlp_out              | L{i}.down_out
    attention head per layer x head         get_act_patch_attn_head_out_all_pos | L{i}.o_in, one head's channels

TransformerLens 4.x runs in its own virtual environment (bench/.venvs/transformer-lens):
`TransformerBridge.boot_transformers(directory, hf_model=...)` on the cached Hugging Face directory actlab
loads, with eager attention (which the bridge forces; actlab's model is switched to eager here too) and
compatibility mode without weight processing (TransformerLens's hook names, the model's own weights).
Prints a table, writes bench/results/transformer_lens_agreement.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from peers import TORCH_SPEC, peer_python, run_peer, write_results

ROOT = Path(__file__).resolve().parents[1]
TABLES = {"resid": "get_act_patch_resid_pre", "mlp": "get_act_patch_mlp_out",
          "heads": "get_act_patch_attn_head_out_all_pos"}

RUNNER = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformer_lens import patching
from transformer_lens.model_bridge import TransformerBridge
path, spec_file, out_file = sys.argv[1:4]
spec = json.load(open(spec_file))
hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
bridge = TransformerBridge.boot_transformers(path, hf_model=hf, tokenizer=AutoTokenizer.from_pretrained(path))
bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
bridge.eval()
out = []
with torch.no_grad():
    for pair in spec["pairs"]:
        clean, corrupt = torch.tensor([pair["clean"]]), torch.tensor([pair["corrupt"]])
        metric = lambda logits: logits[0, -1, pair["answer"]] - logits[0, -1, pair["wrong"]]
        clean_logits, cache = bridge.run_with_cache(clean)
        row = {"clean": float(metric(clean_logits)), "corrupt": float(metric(bridge(corrupt)))}
        for table, fn in spec["tables"].items():
            row[table] = getattr(patching, fn)(bridge, corrupt, cache, metric).double().tolist()
        out.append(row)
json.dump(out, open(out_file, "w"))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--pairs", default="builtin:ioi")
    ap.add_argument("--limit", type=int, default=4, help="the first N pairs")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "transformer_lens_agreement.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    import actlab
    from actlab.data.pairs import load_patch_pairs
    from actlab.models import cache
    from actlab.transforms.steer.patching import attribution_patching, encode_pairs, exact_patching

    python = peer_python("transformer-lens", TORCH_SPEC, "transformer-lens==4.3.0")
    work = Path(tempfile.mkdtemp(prefix="actlab-tl-"))
    rows = []
    for model in args.models.split(","):
        lm = actlab.load_model(model)
        lm.model.set_attn_implementation("eager")
        pairs = encode_pairs(lm, load_patch_pairs(args.pairs)[:args.limit])
        spec = work / "spec.json"
        spec.write_text(json.dumps({"tables": TABLES, "pairs": [
            {"clean": p.clean[0].tolist(), "corrupt": p.corrupt[0].tolist(), "answer": p.answer, "wrong": p.wrong}
            for p in pairs]}))
        theirs_file = work / f"{model}.json"
        print(f"{model}: TransformerLens on {len(pairs)} pairs ...", flush=True)
        run_peer(python, RUNNER, str(cache.entry_path(model)), str(spec), str(theirs_file))
        theirs = json.loads(theirs_file.read_text())
        print(f"{model}: actlab on {len(pairs)} pairs ...", flush=True)
        diffs = {t: 0.0 for t in ("clean", "corrupt", *TABLES)}
        exact_all, attributed_all = {t: [] for t in TABLES}, {t: [] for t in TABLES}
        for pair, their in zip(pairs, theirs):
            ours = exact_patching(lm, pair, "logit-diff", tuple(TABLES))
            scale = ours["clean"] - ours["corrupt"]
            for key in ("clean", "corrupt"):
                diffs[key] = max(diffs[key], abs(ours[key] - their[key]))
            attributed = attribution_patching(lm, pair, "logit-diff", tuple(TABLES))
            for table in TABLES:
                raw = ours[table] * scale + ours["corrupt"]  # actlab normalises; TransformerLens gives the metric
                diffs[table] = max(diffs[table], float((raw - torch.tensor(their[table])).abs().max()))
                exact_all[table].append(ours[table].flatten())
                attributed_all[table].append(attributed[table].flatten())
        for table in TABLES:
            x, y = torch.cat(exact_all[table]), torch.cat(attributed_all[table])
            rows.append({"model": model, "table": table, "pairs": len(pairs), "cells": int(x.numel()),
                         "max_abs_diff": diffs[table], "clean_diff": diffs["clean"], "corrupt_diff": diffs["corrupt"],
                         "attribution_r": float(torch.corrcoef(torch.stack([x, y]))[0, 1])})
    print("\n| model | table | pairs | cells | max abs diff of the patched logit diff | within 1e-4 | "
          "attribution vs exact (r) |")
    print("|---|---|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['table']} | {r['pairs']} | {r['cells']} | {r['max_abs_diff']:.2e} | "
              f"{'yes' if r['max_abs_diff'] <= 1e-4 else 'no'} | {r['attribution_r']:.3f} |")
    print(f"\nunpatched metric, largest difference: clean {max(r['clean_diff'] for r in rows):.2e}, "
          f"corrupted {max(r['corrupt_diff'] for r in rows):.2e}")
    write_results(args.out, {"pairs": args.pairs, "rows": rows})


if __name__ == "__main__":
    main()
