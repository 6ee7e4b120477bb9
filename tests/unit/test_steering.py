"""Steering vectors: each method against an independent computation, pair files and their errors, the train and
sweep jobs on a tiny model (the recipe reproduces the vectors; coefficient 0 is the plain model)."""

from __future__ import annotations

import json

import pytest
import torch

from actlab.data.pairs import load_contrast_pairs, sentiment_pairs, split_half
from actlab.errors import ConfigError
from actlab.jobs import setup
from actlab.jobs.steer import last_token_states, parse_layers, sweep_job, train_job, with_coeff
from actlab.transforms import attach, load_recipe
from actlab.transforms.steer.vectors import get_method, mean_difference, pca_around_midpoints, pca_of_differences


def _states(n=12, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g)
    push = torch.randn(d, generator=g)
    return base + push + 0.1 * torch.randn(n, d, generator=g), base - push


def _top_eigenvector(x: torch.Tensor) -> torch.Tensor:
    """Power iteration on the covariance (an independent route to the first principal component)."""
    c = x.double() - x.double().mean(0)
    cov = c.T @ c
    v = torch.ones(x.shape[1], dtype=torch.float64)
    for _ in range(500):
        v = cov @ v
        v = v / v.norm()
    return v.float()


def test_methods_against_independent_computations():
    pos, neg = _states()
    torch.testing.assert_close(mean_difference(pos, neg), (pos - neg).mean(0), rtol=1e-5, atol=1e-6)
    for got, data in ((pca_of_differences(pos, neg), pos - neg),
                      (pca_around_midpoints(pos, neg), torch.cat([pos - (pos + neg) / 2, neg - (pos + neg) / 2]))):
        ref = _top_eigenvector(data)
        assert abs(float(got @ ref)) > 0.9999 and abs(float(got.norm()) - 1) < 1e-5
        # oriented: most pairs project their positive side higher
        assert int(((pos - neg) @ got > 0).sum()) > len(pos) / 2
    flipped = pca_of_differences(neg, pos)  # the sides swapped: the direction flips
    torch.testing.assert_close(flipped, -pca_of_differences(pos, neg), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="at least two distinct rows"):
        pca_of_differences(pos[:1], neg[:1])
    with pytest.raises(ConfigError, match="unknown steering method"):
        get_method("caa-plus")


def test_pair_files_and_their_errors(tmp_path):
    good = tmp_path / "pairs.jsonl"
    good.write_text(json.dumps({"positive": "a b", "negative": "a c"}) + "\n\n" +
                    json.dumps({"positive": "x", "negative": "y"}) + "\n")
    assert len(load_contrast_pairs(str(good))) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"positive": "a b"}) + "\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: missing negative"):
        load_contrast_pairs(str(bad))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match="not JSON"):
        load_contrast_pairs(str(tmp_path / "broken.jsonl"))
    with pytest.raises(ConfigError, match="unknown pair set"):
        load_contrast_pairs("builtin:nope")
    everything = sentiment_pairs()
    train, test = split_half(everything, "train"), split_half(everything, "test")
    assert len(train) + len(test) == len(everything) and not set(train) & set(test)
    assert all(p.positive[:-1] == p.negative[:-1] and p.positive != p.negative for p in everything)
    for half in (train, test):  # the cheerful answer is (A) in half of each half: letters cancel in a mean
        cheerful_a = sum(p.positive.endswith("(A") for p in half)
        assert abs(2 * cheerful_a - len(half)) <= 1


def test_builtin_arc_pairs_are_the_tasks_scored_texts_and_train_on_the_half_the_sweep_does_not_score():
    from actlab.data.tasks import items, load_task

    task = items(load_task("arc_easy"), None)
    train, test = load_contrast_pairs("builtin:arc-easy:train"), load_contrast_pairs("builtin:arc-easy:test")
    assert len(train) + len(test) == len(task)
    scored_test = {item.contexts[0] + item.continuations[item.target] for item in split_half(task, "test")}
    assert not {p.positive for p in train} & scored_test
    first = task[0]
    assert train[0].positive == first.contexts[0] + first.continuations[first.target]
    assert train[0].negative in {first.contexts[0] + c for i, c in enumerate(first.continuations) if i != first.target}
    text = load_contrast_pairs("builtin:sentiment-text")
    assert all(p.positive.split("Answer: ")[0] == p.negative.split("Answer: ")[0] for p in text)


def test_parse_layers():
    assert parse_layers("2-4,7", 10) == [2, 3, 4, 7]
    assert parse_layers(None, 5) == [1, 2, 3]
    assert parse_layers("all", 3) == [0, 1, 2]
    for bad in ("3-x", "12", ""):
        with pytest.raises(ConfigError, match="--layers"):
            parse_layers(bad, 10)


def test_train_job_saves_the_vectors_it_computed_and_the_sweep_starts_from_the_plain_model(tiny_llama, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"positive": f"item {i} is good", "negative": f"item {i} is bad"} for i in range(8)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    save = tmp_path / "vec.json"
    out = train_job("tiny-llama", pairs=str(pairs), save=str(save), layers="0-1", method="mean-diff", coeff=2.0,
                    log=lambda *a: None)
    recipe = load_recipe(save)
    states = last_token_states(tiny_llama, [r["positive"] for r in rows] + [r["negative"] for r in rows], [0, 1])
    for edit, layer in zip(recipe.edits, (0, 1)):
        assert edit.site == f"L{layer}.resid_out" and edit.coeff == 2.0
        torch.testing.assert_close(edit.value, (states[layer][:8] - states[layer][8:]).mean(0), rtol=1e-5, atol=1e-6)
    assert out["layers"] == [0, 1] and all(0 <= s <= 1 for s in out["separation"].values())
    assert {e.coeff for e in with_coeff(recipe, 5.0).edits} == {5.0}
    swept = sweep_job("tiny-llama", recipe=str(save), pairs=str(pairs), coeffs=[3.0], windows=0, log=lambda *a: None)
    assert [r["coeff"] for r in swept["rows"]] == [0.0, 3.0] and swept["rows"][0]["shift"][0] == 0
    # p(positive) against a brute force: whole-text log-probabilities from plain forwards
    def brute(lm):
        ps = []
        for r in rows:
            a, b = (lm.tokenizer(r[k])["input_ids"] for k in ("positive", "negative"))
            common = next(i for i in range(len(a)) if a[i] != b[i])
            lp = []
            for ids in (a, b):
                with torch.no_grad():
                    logp = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
                lp.append(sum(float(logp[t - 1, ids[t]]) for t in range(common, len(ids))))
            ps.append(1 / (1 + float(torch.tensor(lp[1] - lp[0]).exp())))
        return sum(ps) / len(ps)

    assert abs(swept["rows"][0]["p_positive"][0] - brute(tiny_llama)) < 1e-5
    with attach(tiny_llama, with_coeff(recipe, 3.0)):
        assert abs(swept["rows"][1]["p_positive"][0] - brute(tiny_llama)) < 1e-5
    assert swept["rows"][1]["p_positive"][0] != swept["rows"][0]["p_positive"][0]
    shift = swept["rows"][1]["shift"][0]  # a paired difference has the difference of the means
    assert abs(shift - (swept["rows"][1]["p_positive"][0] - swept["rows"][0]["p_positive"][0])) < 1e-12
    # perplexity beside it: the plain model's and the steered one's, each a plain loss loop on the same windows
    swept = sweep_job("tiny-llama", recipe=str(save), pairs=str(pairs), coeffs=[3.0], eval_data="python-docs",
                      seq_len=32, windows=2, progress=False, log=lambda *a: None)
    windows = setup.eval_windows(tiny_llama, "python-docs", 32, 2)[1]

    def loss_loop_ppl():
        with torch.no_grad():
            losses = [torch.nn.functional.cross_entropy(tiny_llama.model(input_ids=w[None]).logits[0, :-1].double(),
                                                        w[1:]) for w in windows]
        return float(torch.stack(losses).mean().exp())

    plain = loss_loop_ppl()
    with attach(tiny_llama, with_coeff(recipe, 3.0)):
        steered = loss_loop_ppl()
    assert swept["rows"][0]["ppl"] == pytest.approx(plain, rel=1e-5) and swept["rows"][0]["ppl_change"] == 0
    assert swept["rows"][1]["ppl"] == pytest.approx(steered, rel=1e-5) and steered != pytest.approx(plain)
    assert swept["rows"][1]["ppl_change"] == pytest.approx(steered / plain - 1, rel=1e-4)


def test_control_vector_gguf_holds_coeff_times_direction_per_layer(tiny_llama, tmp_path):
    """The file repeng and llama.cpp read: architecture controlvector, direction.{layer} = coeff x vector."""
    import gguf

    from actlab.export import export_gguf
    from actlab.transforms.steer import InterventionRecipe, SiteEdit

    d = tiny_llama.adapter.hidden_size
    v1, v2 = torch.randn(d), torch.randn(d)
    recipe = InterventionRecipe("pca-diff", tiny_llama.identity.to_dict(),
                                [SiteEdit("L1.resid_out", "add", v1, 3.0), SiteEdit("L2.resid_out", "add", v2, -2.0)])
    out = export_gguf(tiny_llama, recipe, tmp_path / "vec.gguf")
    assert out["arch"] == "controlvector" and out["tensors"] == 2
    reader = gguf.GGUFReader(str(tmp_path / "vec.gguf"))
    arch = reader.get_field("general.architecture")
    assert bytes(arch.parts[-1]).decode() == "controlvector"
    assert bytes(reader.get_field("controlvector.model_hint").parts[-1]).decode() == "llama"
    got = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    torch.testing.assert_close(got["direction.1"], 3.0 * v1)
    torch.testing.assert_close(got["direction.2"], -2.0 * v2)
    for bad, message in ((SiteEdit("L0.resid_out", "add", v1), "layer 0"),
                         (SiteEdit("L1.resid_out", "add", v1, positions=[-1]), "every position"),
                         (SiteEdit("L1.mlp_in", "add", v1), "--format hf")):
        with pytest.raises(ConfigError, match=message):
            export_gguf(tiny_llama, InterventionRecipe("m", tiny_llama.identity.to_dict(), [bad]),
                        tmp_path / f"bad{len(message)}.gguf")
