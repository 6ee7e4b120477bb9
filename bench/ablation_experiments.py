"""Two ablation experiments of the papers behind actlab, on any model, with the loss change and its error.

(a) Massive activations (Sun et al. 2024, "Massive Activations in Large Language Models"): the few residual
    channels whose activations are orders of magnitude above the median are found on the evaluation windows
    (max |x| over positions at each layer's output; a channel is massive where its max is > 100 and > 1000 x
    the layer's median |x|, at the first layer where it is); setting them to their mean at that layer is compared
    with the same mean ablation of as many random channels of that layer (3 draws).
(b) The attention sink (Xiao et al. 2024, StreamingLLM; Gu et al. 2025): the first token's value vectors are
    zeroed in every layer (the sink's share of each head's output removed while the attention it takes stays),
    compared with zeroing the value vectors of another position.

    python bench/ablation_experiments.py --model smollm2-135m --windows 8 --seq-len 512 \
        --json bench/results/ablation_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from actlab.jobs import setup  # noqa: E402
from actlab.models.keys import site_key  # noqa: E402
from actlab.transforms.steer.ablation import loss_change, window_nll  # noqa: E402
from actlab.transforms.steer.intervene import record  # noqa: E402


@torch.no_grad()
def massive_channels(lm, windows: torch.Tensor, ratio: float = 1000.0, floor: float = 100.0):
    """(layer, channels): the first layer whose output has massive channels, and those channels."""
    sites = [site_key(i, "resid_out") for i in range(lm.adapter.num_layers)]
    peak = {s: None for s in sites}
    median = {s: [] for s in sites}
    for k in range(len(windows)):
        views = record(lm, windows[k:k + 1], sites)
        for s in sites:
            x = views[s][0].abs().float()
            top = x.amax(0)
            peak[s] = top if peak[s] is None else torch.maximum(peak[s], top)
            median[s].append(float(x.median()))
    for i, s in enumerate(sites):
        med = sorted(median[s])[len(median[s]) // 2]
        chosen = [int(c) for c in torch.nonzero((peak[s] > floor) & (peak[s] > ratio * med)).flatten()]
        if chosen:
            return i, chosen, float(peak[s].max()), med
    return None, [], 0.0, 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--eval", default="wikitext2:test")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    lm = setup.model(args.model, lambda m: print(m, file=sys.stderr))
    _, windows = setup.eval_windows(lm, args.eval, args.seq_len, args.windows)
    dense = window_nll(lm, windows)
    out = {"model": lm.name, "eval": args.eval, "seq_len": args.seq_len, "windows": len(windows),
           "loss_dense": sum(dense) / len(dense)}

    layer, channels, peak, med = massive_channels(lm, windows)
    rows = []
    if channels:
        spec = ",".join(map(str, channels))
        rows.append({"what": f"massive channels {spec} at L{layer}.resid_out, to their mean",
                     **loss_change(lm, windows, [f"L{layer}.resid_out[{spec}]"], "mean", dense)})
        width = lm.adapter.hidden_size
        for seed in range(3):
            pick = random.Random(seed).sample([c for c in range(width) if c not in channels], len(channels))
            spec_r = ",".join(map(str, sorted(pick)))
            rows.append({"what": f"random channels {spec_r} at L{layer}.resid_out, to their mean (seed {seed})",
                         **loss_change(lm, windows, [f"L{layer}.resid_out[{spec_r}]"], "mean", dense)})
    out["massive"] = {"layer": layer, "channels": channels, "peak": peak, "median_abs": med, "rows": rows}

    all_v = [site_key(i, "v") for i in range(lm.adapter.num_layers)]
    sink_rows = []
    for position, label in ((0, "the first token (the sink)"), (args.seq_len // 2, "a middle token")):
        sink_rows.append({"what": f"value vectors of {label}, position {position}, zeroed in every layer",
                          **loss_change(lm, windows, all_v, "zero", dense, positions=[position])})
    out["sink"] = sink_rows

    for r in rows + sink_rows:
        print(f"{r['what']}: loss {r['loss_dense']:.4f} -> {r['loss']:.4f} ({r['delta']:+.4f} ± {r['stderr']:.4f}), "
              f"ppl {r['ppl_dense']:.2f} -> {r['ppl']:.2f}")
    if not channels:
        print("no massive channels found (max |x| > 100 and > 1000 x median)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
