"""The steering jobs: train vectors from contrastive pairs, generate with them, and measure what they do.

train     residual states at the last token of each side of every pair (as repeng reads them), at each chosen
          layer's output; one direction per layer by the chosen method; an intervention recipe that adds
          coeff x direction at L{i}.resid_out at every position (the vectors in its safetensors sidecar).
generate  the same prompt without and with the recipe (at a chosen coefficient).
sweep     per coefficient: the behaviour (mean probability of the positive side given the pair's common
          prefix, on held-out pairs: CAA's A/B metric), accuracy on a task's held-out half, and perplexity.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from actlab.data.pairs import ContrastPair, load_contrast_pairs
from actlab.errors import ConfigError
from actlab.jobs import setup
from actlab.models.keys import site_key
from actlab.transforms.steer import InterventionRecipe, SiteEdit, record


def parse_layers(spec: str | Sequence[int] | None, num_layers: int) -> list[int]:
    """"10-20", "3,5,7", "all" or None (all but the first and last, repeng's default range) -> layer indices."""
    if spec is None:
        return list(range(1, num_layers - 1)) or list(range(num_layers))
    if not isinstance(spec, str):
        layers = [int(i) for i in spec]
    elif spec.strip() == "all":
        layers = list(range(num_layers))
    else:
        layers = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            lo, sep, hi = part.partition("-")
            try:
                layers += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
            except ValueError as exc:
                raise ConfigError(f"--layers {spec!r}: give ranges and indices like 10-20 or 3,5,7") from exc
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise ConfigError(f"--layers {spec!r}: the model has layers 0..{num_layers - 1}")
    return sorted(set(layers))


@torch.no_grad()
def last_token_states(lm: Any, texts: list[str], layers: list[int], batch_size: int = 16) -> dict[int, torch.Tensor]:
    """The residual stream leaving each layer at the last token of each text, {layer: [texts, width]}."""
    encoded = [lm.tokenizer(t, verbose=False)["input_ids"] for t in texts]
    sites = [site_key(i, "resid_out") for i in layers]
    out: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        width = max(len(ids) for ids in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)  # right padding: causal attention never sees it
        for row, seq in enumerate(batch):
            ids[row, :len(seq)] = torch.tensor(seq)
        views = record(lm, ids, sites)
        last = torch.tensor([len(seq) - 1 for seq in batch])
        for i, site in zip(layers, sites):
            out[i].append(views[site][torch.arange(len(batch)), last].float().cpu())
    return {i: torch.cat(v) for i, v in out.items()}


def train_vectors(lm: Any, pairs: list[ContrastPair], layers: list[int], method: str
                  ) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
    """{layer: direction} and {layer: the fraction of pairs whose positive side projects higher}."""
    from actlab.transforms.steer.vectors import get_method

    chosen = get_method(method)
    states = last_token_states(lm, [p.positive for p in pairs] + [p.negative for p in pairs], layers)
    n = len(pairs)
    vectors, separation = {}, {}
    for i in layers:
        pos, neg = states[i][:n], states[i][n:]
        vectors[i] = chosen.direction(pos, neg)
        separation[i] = float(((pos - neg) @ vectors[i] > 0).double().mean())
    return vectors, separation


def steering_recipe(lm: Any, vectors: dict[int, torch.Tensor], method: str, coeff: float, pairs_spec: str,
                    n_pairs: int) -> InterventionRecipe:
    edits = [SiteEdit(site_key(i, "resid_out"), "add", v, coeff) for i, v in sorted(vectors.items())]
    return InterventionRecipe(method, lm.identity.to_dict(), edits,
                              params={"layers": sorted(vectors), "coeff": coeff, "site": "resid_out"},
                              calibration={"pairs": pairs_spec, "n": n_pairs})


def with_coeff(recipe: InterventionRecipe, coeff: float) -> InterventionRecipe:
    """The recipe with every addition at coefficient `coeff`."""
    if not isinstance(recipe, InterventionRecipe):
        raise ConfigError(f"--coeff applies to steering recipes, not {recipe.describe()}")
    edits = [dataclasses.replace(e, coeff=float(coeff)) if e.op == "add" else e for e in recipe.edits]
    return dataclasses.replace(recipe, edits=edits, params={**recipe.params, "coeff": float(coeff)})


def train_job(model: str, *, pairs: str, save: str, layers: str | None = None, method: str = "pca-diff",
              coeff: float = 1.0, log: Callable[[str], None] = print) -> dict[str, Any]:
    from actlab.transforms.steer.vectors import get_method

    get_method(method)  # an unknown method fails before the model loads
    contrast = load_contrast_pairs(pairs)
    lm = setup.model(model, log)
    chosen = parse_layers(layers, lm.adapter.num_layers)
    vectors, separation = train_vectors(lm, contrast, chosen, method)
    recipe = steering_recipe(lm, vectors, method, coeff, pairs, len(contrast))
    recipe.save(save)
    return {"model": lm.name, "recipe": recipe.describe(), "method": method, "pairs": len(contrast),
            "layers": chosen, "coeff": coeff, "norms": {i: float(v.norm()) for i, v in vectors.items()},
            "separation": separation, "path": save}


def generate_job(model: str, *, recipe: str, prompt: str, coeff: float | None = None, max_new_tokens: int = 48,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    from actlab.transforms import attach, load_recipe

    steer = load_recipe(recipe)
    if coeff is not None:
        steer = with_coeff(steer, coeff)
    lm = setup.model(model, log)
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"].to(lm.device)

    def run() -> str:
        out = lm.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=lm.tokenizer.pad_token_id or lm.tokenizer.eos_token_id)
        return lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    plain = run()
    with attach(lm, steer):
        steered = run()
    return {"model": lm.name, "recipe": steer.describe(), "coeff": steer.params.get("coeff"), "prompt": prompt,
            "plain": plain, "steered": steered}


# -- measuring -------------------------------------------------------------------------------------------

@torch.no_grad()
def positive_probability(lm: Any, pairs: list[ContrastPair]) -> list[float]:
    """Per pair, p(positive) / (p(positive) + p(negative)) of the two texts' differing tokens after their
    common token prefix (for an A/B pair: the probability of the positive answer letter)."""
    from actlab.eval.scoring import score_continuations

    out = []
    for pair in pairs:
        a = lm.tokenizer(pair.positive, verbose=False)["input_ids"]
        b = lm.tokenizer(pair.negative, verbose=False)["input_ids"]
        common = 0
        while common < min(len(a), len(b)) - 1 and a[common] == b[common]:
            common += 1
        if common == 0:
            raise ConfigError(f"pair {pair.positive[:40]!r} / {pair.negative[:40]!r} shares no prefix to compare "
                              "the two sides after")
        up, down = score_continuations(lm, a[:common], [a[common:], b[common:]])
        out.append(float(torch.sigmoid(torch.tensor(up.loglikelihood - down.loglikelihood))))
    return out


def sweep_job(model: str, *, recipe: str, pairs: str, coeffs: Sequence[float], task: str | None = None,
              half: str = "test", eval_data: str | None = "wikitext2:test", seq_len: int = 1024, windows: int = 8,
              limit: int | None = None, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Per coefficient (0 = the model as it is): behaviour on held-out pairs, task accuracy on a half, ppl."""
    from actlab.data.pairs import split_half
    from actlab.data.tasks import items, load_task
    from actlab.eval import metrics as M
    from actlab.eval.perplexity import perplexity
    from actlab.eval.scoring import score_item
    from actlab.transforms import attach, load_recipe

    steer = load_recipe(recipe)
    with_coeff(steer, 1.0)  # a steering recipe, or a clear error
    heldout = load_contrast_pairs(pairs)
    task_items = split_half(items(load_task(task), None), half)[:limit] if task else []
    lm = setup.model(model, log)
    corpus_windows = setup.eval_windows(lm, eval_data, seq_len, windows)[1] if windows else None
    rows: list[dict[str, Any]] = []
    baseline: dict[str, Any] = {}
    for coeff in [0.0, *(c for c in coeffs if c != 0)]:  # 0: the model as it is, the baseline of every shift
        ctx = attach(lm, with_coeff(steer, coeff)) if coeff else contextlib.nullcontext()
        with ctx:
            p = positive_probability(lm, heldout)
            row: dict[str, Any] = {"coeff": coeff, "p_positive": M.mean_stderr(p)}
            per_item = {"p_positive": p}
            if task_items:
                correct = []
                for item in task_items:
                    scores = [s.loglikelihood for s in score_item(lm, item)]
                    correct.append(float(max(range(len(scores)), key=scores.__getitem__) == item.target))
                row["task_acc"] = M.mean_stderr(correct)
                per_item["task_acc"] = correct
            if corpus_windows is not None:
                row["ppl"] = perplexity(lm, corpus_windows, progress=progress, description=f"ppl, coeff {coeff}").ppl
                per_item["ppl"] = row["ppl"]
        baseline = baseline if rows else per_item  # the first row is the plain model
        # shifts against the plain model on the same pairs and items: paired standard errors
        row["shift"] = M.mean_stderr([a - b for a, b in zip(p, baseline["p_positive"])])
        if task_items:
            row["task_gain"] = M.mean_stderr([a - b for a, b in zip(correct, baseline["task_acc"])])
        if "ppl" in row:
            row["ppl_change"] = row["ppl"] / baseline["ppl"] - 1
        rows.append(row)
        log(_row_line(row))
    return {"model": lm.name, "recipe": steer.describe(), "pairs": pairs, "n_pairs": len(heldout), "task": task,
            "half": half, "task_items": len(task_items), "eval_data": eval_data if windows else None, "rows": rows}


def _row_line(row: dict[str, Any]) -> str:
    parts = [f"coeff {row['coeff']:g}", f"p(positive) {row['p_positive'][0]:.4f} ± {row['p_positive'][1]:.4f}",
             f"shift {row['shift'][0]:+.4f} ± {row['shift'][1]:.4f}"]
    if "task_acc" in row:
        parts.append(f"acc {row['task_acc'][0]:.4f} ± {row['task_acc'][1]:.4f} "
                     f"(gain {row['task_gain'][0]:+.4f} ± {row['task_gain'][1]:.4f})")
    if "ppl" in row:
        parts.append(f"ppl {row['ppl']:.4f}")
    return "  ".join(parts)


def sweep_table(out: dict[str, Any]) -> str:
    """Markdown; every ± is a standard error, those of shift and gain paired with the plain model (coeff 0)."""
    head = ["coeff", "p(positive)", "±", "shift", "±"] + (["acc", "±", "gain", "±"] if out["task"] else []) + \
           (["ppl", "Δppl"] if out["eval_data"] else [])
    lines = ["|" + "|".join(head) + "|", "|" + "|".join("---:" for _ in head) + "|"]
    for r in out["rows"]:
        cells = [f"{r['coeff']:g}", f"{r['p_positive'][0]:.4f}", f"{r['p_positive'][1]:.4f}", f"{r['shift'][0]:+.4f}",
                 f"{r['shift'][1]:.4f}"]
        if out["task"]:
            cells += [f"{r['task_acc'][0]:.4f}", f"{r['task_acc'][1]:.4f}", f"{r['task_gain'][0]:+.4f}",
                      f"{r['task_gain'][1]:.4f}"]
        if out["eval_data"]:
            cells += [f"{r['ppl']:.4f}", f"{100 * r['ppl_change']:+.2f}%"]
        lines.append("|" + "|".join(cells) + "|")
    return "\n".join(lines)

