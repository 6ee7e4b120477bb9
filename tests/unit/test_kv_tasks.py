"""Long-context evaluation: RULER-style synthetic items generated deterministically at a token length, a document
and its question read as two forwards (what one forward computes, unless a KV recipe compresses in between), and
question-aware recipes reading them as one."""

from __future__ import annotations

import re

import pytest

import actlab
from actlab.data.tasks import items, load_task
from actlab.data.tasks.synthetic import KINDS, SyntheticSpec, generate
from actlab.errors import ConfigError
from actlab.eval.scoring import encode_shared, question_split, score_continuations, score_item
from actlab.transforms import attach
from actlab.transforms.base import NoCalibration
from actlab.transforms.kv import get_method
from actlab.transforms.kv.session import SESSION


@pytest.fixture(scope="module")
def smol_tokenizer():
    return actlab.load_model("tiny-llama").tokenizer


@pytest.mark.parametrize("kind", KINDS)
def test_synthetic_items_are_deterministic_at_their_length(kind, smol_tokenizer):
    spec = SyntheticSpec(kind, length=1024, items=3)
    docs = generate(spec, smol_tokenizer)
    assert docs == generate(spec, smol_tokenizer)  # the same items every time
    assert docs != generate(SyntheticSpec(kind, length=1024, items=3, seed=1), smol_tokenizer)
    for doc in docs:
        assert 0.95 * 1024 <= doc["tokens"] + len(smol_tokenizer(doc["answer"])["input_ids"]) <= 1024 + 8
        value = doc["answer"].strip()
        assert value.isdigit() and value in doc["document"] and value not in doc["question"]
        if kind == "variable_tracking":  # the chain reads in order: each variable is assigned before it is used
            names = re.findall(r"VAR (\w+) =", doc["document"])
            assert doc["question"].split("VAR ")[-1].rstrip(" =") == names[-1]


def test_a_synthetic_task_takes_its_length_from_the_name():
    spec = load_task("niah_single@2048")
    assert spec.task == "niah_single@2048" and spec.synthetic().length == 2048
    with pytest.raises(ConfigError, match="@LENGTH"):
        load_task("niah_single@long")
    with pytest.raises(ConfigError, match="@LENGTH"):
        load_task("piqa@2048")


def test_a_document_and_its_question_in_two_forwards_score_as_one(tiny_llama):
    lm = tiny_llama
    spec = load_task("niah_single@480")
    spec.dataset.synthetic = {**spec.dataset.synthetic, "haystack": "python-docs"}
    for item in items(spec, 3, lm.tokenizer):
        context, continuations = encode_shared(lm.tokenizer, item.contexts[0], item.continuations)
        split = question_split(lm.tokenizer, item, context)
        assert split is not None and 0 < split < len(context)
        whole = score_continuations(lm, context, continuations)
        parts = score_continuations(lm, context, continuations, split)
        assert parts[0].loglikelihood == pytest.approx(whole[0].loglikelihood, abs=1e-4)
        assert parts[0].greedy == whole[0].greedy


def test_query_agnostic_recipes_compress_after_the_document_and_question_aware_ones_after_the_question(tiny_llama):
    lm = tiny_llama
    spec = load_task("passkey@480")
    spec.dataset.synthetic = {**spec.dataset.synthetic, "haystack": "python-docs"}
    item = items(spec, 1, lm.tokenizer)[0]
    context, continuations = encode_shared(lm.tokenizer, item.contexts[0], item.continuations)
    split = question_split(lm.tokenizer, item, context)
    for aware in (False, True):
        r = get_method("snapkv", window=4, question_aware=aware).calibrate(NoCalibration(lm), 0.75)
        with attach(lm, r):
            score_item(lm, item)
            state = lm.adapter.layers[0].attn.__dict__[SESSION].layers[0]
            compressed_at = int(state.alive[0, 0].sum())  # kept of what it had seen when it compressed
            expect = int((len(context) if aware else split) * 0.25)
            assert compressed_at == expect + (0 if aware else len(context) - split) + len(continuations[0])
        with attach(lm, r):
            ref = score_continuations(lm, context, continuations, None if aware else split)
        with attach(lm, r):
            assert score_item(lm, item)[0].loglikelihood == pytest.approx(ref[0].loglikelihood, abs=1e-5)


def test_documents_read_once_for_many_kv_recipes_score_as_each_recipe_alone(tiny_llama, monkeypatch):
    from actlab.eval.harness import DENSE, Column, evaluate
    from actlab.transforms import compose
    from actlab.transforms.layers import LayerRecipe

    lm = tiny_llama
    spec = load_task("niah_single@480")
    spec.dataset.synthetic = {**spec.dataset.synthetic, "haystack": "python-docs"}
    make = lambda name, ratio, **p: get_method(name, **p).calibrate(NoCalibration(lm), ratio)  # noqa: E731
    recipes = {"snap": make("snapkv", 0.5, window=8), "h2o": make("h2o", 0.75, phase="decode"),
               "int4": make("kivi", 0.0, bits=4, group=16),
               "pyr+int8": compose(make("pyramidkv", 0.875, window=8), make("kivi", 0.0, bits=8)),
               "aware": make("tova", 0.5, question_aware=True),
               "layer": LayerRecipe("manual", lm.identity.to_dict(), ["L1.attn"])}
    from actlab.eval import shared

    read, original = [], shared.score_shared
    monkeypatch.setattr(shared, "score_shared", lambda lm, item, rs: read.append(len(rs)) or original(lm, item, rs))
    together = evaluate(lm, [spec], [Column(DENSE)] + [Column(n, r) for n, r in recipes.items()], limit=3,
                        progress=False, log=lambda m: None)
    monkeypatch.undo()
    assert read == [5, 5, 5]  # dense and the four KV columns that compress after the document, per item
    for col in together.columns:
        alone = evaluate(lm, [spec], [Column(col.name, col.recipe)], limit=3, progress=False, log=lambda m: None)
        mine, ref = col.results[spec.task].records, alone.columns[0].results[spec.task].records
        assert [r["acc"] for r in mine] == [r["acc"] for r in ref], col.name
        assert [r["loglikelihoods"][0] for r in mine] == pytest.approx([r["loglikelihoods"][0] for r in ref], abs=1e-4)
    assert together.columns[1].measured["kv_kept_fraction"] < 0.75
