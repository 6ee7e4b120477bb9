"""loss-aware's first two open choices on each model: sensitivity estimate x rule form, at one budget.

    python bench/loss_aware_ablation.py [--models smollm2-135m gemma3-270m] [--sparsity 0.5] [--windows 4]

For every (sensitivity, rule) in {mean-square, typical} x {threshold, top-k, relative}: the recipe (no
refinement, no shrinkage toward uniform), its selection loss on the last two calibration windows (what
`loss-aware` itself compares) and its perplexity on the first --windows x 1024 tokens of WikiText-2 test.
Shows whether the calibration-loss choice picks the variant that is best on held-out text. Prints a
Markdown table, writes bench/results/loss_aware_ablation.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--out", default="bench/results/loss_aware_ablation.json")
    args = ap.parse_args()

    import actlab
    from actlab.data import WindowSpec, load_corpus, make_windows
    from actlab.eval import perplexity
    from actlab.fsutil import atomic_write_json
    from actlab.transforms.sparsity import CalibrationData
    from actlab.transforms.sparsity.harness import evaluate
    from actlab.transforms.sparsity.loss_aware import RULES, SENSITIVITIES, LossAware, calibration_loss

    rows = []
    lines = ["| model | sensitivity | rule | selection loss | ppl | increase | achieved |",
             "|---|---|---|---|---|---|---|"]
    for model in args.models:
        lm = actlab.load_model(model)
        calib = CalibrationData.from_corpus(lm, "wikitext2", seq_len=1024, windows=16)
        ev = make_windows(lm.tokenizer, load_corpus("wikitext2", role="eval"),
                          WindowSpec(seq_len=1024, num_windows=args.windows), lm.max_context)
        dense = perplexity(lm, ev, batch_size=1, progress=False).ppl
        method = LossAware()
        for sensitivity in SENSITIVITIES:
            for rule in RULES:
                recipe = method.candidate(calib, args.sparsity, sensitivity, rule)
                loss = calibration_loss(calib, recipe, calib.windows[-method.select_windows:])
                result = evaluate(lm, recipe, ev, progress=False)
                rows.append({"model": model, "sensitivity": sensitivity, "rule": rule, "selection_loss": loss,
                             "dense_ppl": dense, "sparse_ppl": result.sparse_ppl,
                             "achieved_sparsity": result.achieved_sparsity})
                lines.append(f"| {model} | {sensitivity} | {rule} | {loss:.4f} | {result.sparse_ppl:.2f} | "
                             f"{result.sparse_ppl / dense - 1:+.1%} | {result.achieved_sparsity:.3f} |")
                print(lines[-1], flush=True)
    print("\n".join(lines))
    atomic_write_json(Path(args.out), {"sparsity": args.sparsity, "windows": args.windows, "rows": rows})


if __name__ == "__main__":
    main()
