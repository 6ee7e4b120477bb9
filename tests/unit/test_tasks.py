"""Evaluation tasks and scoring: YAML tasks as data, scores against an independent one-request-at-a-time
computation with full logits, lm-eval's metric definitions recomputed by hand, clear errors for bad tasks."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from actlab.data.tasks import Item, items, load_task, read_docs, task_names
from actlab.errors import ConfigError
from actlab.eval import metrics
from actlab.eval.harness import DENSE, Column, evaluate
from actlab.eval.scoring import encode_pair, encode_shared, score_continuations, score_item

from ..conftest import shared_data


def reference_score(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Sum of log-probabilities and greediness of `continuation`, from one full forward with every logit."""
    ids = context + continuation
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    steps = range(len(context), len(ids))
    return (sum(float(logprobs[p - 1, ids[p]]) for p in steps),
            all(int(logprobs[p - 1].argmax()) == ids[p] for p in steps))


ITEMS = [
    Item(0, ("Question: What do plants need to grow?\nAnswer:",), (" sunlight and water", " darkness", " sand only"),
         ("sunlight and water", "darkness", "sand only"), 0),
    Item(1, ("Question: How do you open a jar?\nAnswer:",), (" Twist the lid.", " Freeze it for a year."),
         ("Twist the lid.", "Freeze it for a year."), 1),
    Item(2, ("Question: Which is a planet?\nAnswer:",), (" Mars", " the Moon", " a comet", " Sirius, a bright star"),
         ("Mars", "the Moon", "a comet", "Sirius, a bright star"), 3),
]


def test_shared_context_scores_match_full_sequences(tiny):
    # the context runs once and its KV cache serves every choice; choices of unequal length share a padded batch
    for item in ITEMS:
        context, continuations = encode_shared(tiny.tokenizer, item.contexts[0], item.continuations)
        got = score_continuations(tiny, context, continuations)
        want = [reference_score(tiny.model, context, c) for c in continuations]
        assert [s.loglikelihood for s in got] == pytest.approx([w[0] for w in want], rel=1e-4, abs=1e-4)
        assert [s.greedy for s in got] == [w[1] for w in want]


def test_single_token_and_greedy_continuations(tiny_llama):
    context = tiny_llama.tokenizer("Question: pick one\nAnswer:")["input_ids"]
    with torch.no_grad():
        best = int(tiny_llama.model(torch.tensor([context])).logits[0, -1].argmax())
    got = score_continuations(tiny_llama, context, [[5], [17], [best]])
    want = [reference_score(tiny_llama.model, context, [t]) for t in (5, 17, best)]
    assert [s.loglikelihood for s in got] == pytest.approx([w[0] for w in want], rel=1e-4, abs=1e-4)
    assert got[2].greedy and [s.greedy for s in got] == [w[1] for w in want]


def test_encoding_follows_lm_eval(tiny_llama):
    tok = tiny_llama.tokenizer
    context, continuation = encode_pair(tok, "Question: a\nAnswer: ", "yes")  # trailing space moves
    assert context == tok("Question: a\nAnswer:")["input_ids"]
    assert context + continuation == tok("Question: a\nAnswer: yes")["input_ids"]
    assert encode_pair(tok, "", " x")[0] == [tok.bos_token_id]


def test_accuracies_recomputed_independently(tiny):
    """acc: the highest log-likelihood; acc_norm (lm-eval): the highest log-likelihood per character of the choice
    text, the delimiter not counted; standard errors: sample std / sqrt(n)."""
    acc, acc_norm = [], []
    for item in ITEMS:
        context, continuations = encode_shared(tiny.tokenizer, item.contexts[0], item.continuations)
        lls = np.array([reference_score(tiny.model, context, c)[0] for c in continuations])
        acc.append(float(np.argmax(lls) == item.target))
        acc_norm.append(float(np.argmax(lls / np.array([len(c) for c in item.choices])) == item.target))
    from actlab.data.tasks import DatasetSpec, TaskSpec

    spec = TaskSpec("toy", DatasetSpec(jsonl="unused.jsonl"), "multiple_choice", doc_to_choice="x", doc_to_target="0")
    from actlab.eval.harness import _run

    result = _run(tiny, spec, ITEMS, "toy", progress=False)
    assert result.metrics["acc"] == pytest.approx((np.mean(acc), np.std(acc, ddof=1) / math.sqrt(3)), nan_ok=True)
    assert result.metrics["acc_norm"] == pytest.approx((np.mean(acc_norm), np.std(acc_norm, ddof=1) / math.sqrt(3)),
                                                       nan_ok=True)


def test_partial_scoring_scores_the_shared_continuation(tiny_llama):
    item = Item(0, ("The trophy did not fit in the suitcase because the trophy", "The trophy did not fit in the "
                    "suitcase because the suitcase"), (" was too big.",), ("a", "b"), 0)
    got = score_item(tiny_llama, item)
    want = [reference_score(tiny_llama.model, *encode_pair(tiny_llama.tokenizer, c, " was too big."))[0]
            for c in item.contexts]
    assert [s.loglikelihood for s in got] == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_metric_formulas():
    x = [1.0, 0.0, 1.0, 1.0]
    assert metrics.mean_stderr(x) == pytest.approx((0.75, np.std(x, ddof=1) / 2))
    lls = [-1.0, -2.0, -0.5]
    ppl, se = metrics.perplexity_of_loglikelihoods(lls)
    assert ppl == pytest.approx(math.exp(3.5 / 3)) and se == pytest.approx(ppl * np.std(lls, ddof=1) / math.sqrt(3))
    d, dse = metrics.paired_difference([1, 0, 1, 0], [1, 1, 1, 0])
    assert (d, dse) == pytest.approx((0.25, np.std([0, 1, 0, 0], ddof=1) / 2))


# -- task files ------------------------------------------------------------------------------------

def _task(tmp_path, body: str, rows: list[dict] | None = None, name: str = "mine"):
    if rows is not None:
        (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / f"{name}.yaml"
    path.write_text(body)
    return path


ROWS = [{"q": "2 + 2 =", "options": ["four", "five", "twenty-two"], "answer": "four"},
        {"q": "The sky is", "options": ["blue", "made of cheese"], "answer": "blue"},
        {"q": "Fire is", "options": ["cold", "hot"], "answer": 1}]
MINE = """task: mine
dataset: {jsonl: data.jsonl}
output_type: multiple_choice
doc_to_text: "Q: {{q}}\\nA:"
doc_to_choice: "{{options}}"
doc_to_target: "{{answer}}"
"""


def test_a_yaml_task_needs_no_code_and_runs_through_the_cli(tmp_path):
    path = _task(tmp_path, MINE, ROWS)
    spec = load_task(str(path))
    got = items(spec)
    assert [i.target for i in got] == [0, 0, 1] and got[0].continuations == (" four", " five", " twenty-two")
    assert got[0].contexts == ("Q: 2 + 2 =\nA:",) and got[1].choices == ("blue", "made of cheese")
    out = subprocess.run([sys.executable, "-m", "actlab.cli", "eval", "--model", "tiny-llama", "--tasks", str(path),
                          "--json", "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    dense = result["columns"][0]
    assert dense["name"] == DENSE and dense["tasks"]["mine"]["n"] == 3
    assert set(dense["tasks"]["mine"]["metrics"]) == {"acc", "acc_norm"}
    records = [json.loads(x) for x in (tmp_path / "run" / "items" / DENSE / "mine.jsonl").read_text().splitlines()]
    assert [r["target"] for r in records] == [0, 0, 1] and len(records[0]["loglikelihoods"]) == 3
    assert (tmp_path / "run" / "compare.html").stat().st_size > 5000


@pytest.mark.parametrize("body,rows,message", [
    (MINE.replace("{{q}}", "{{q"), ROWS, "doc_to_text: bad template"),
    (MINE, [{"q": "x", "options": ["a", "b"], "answer": 7}], "item 0: doc_to_target gave 7, not an index among 2"),
    (MINE, [{"q": "x", "options": ["a", "b"], "answer": "c"}], "neither an index nor one of the choices"),
    (MINE, [{"q": "x", "options": "ab", "answer": 0}], "doc_to_choice must give a non-empty list"),
    (MINE, [{"options": ["a"], "answer": 0}], "item 0: template .* failed on this item"),
    (MINE.replace("multiple_choice", "multiple-choice"), ROWS, "output_type: must be one of"),
    (MINE + "metrics: [perplexity]\n", ROWS, "does not apply to multiple_choice"),
    (MINE.replace("dataset: {jsonl: data.jsonl}", "dataset: {}"), ROWS, "dataset needs exactly one of"),
    (MINE + "colour: red\n", ROWS, "unknown field"),
])
def test_bad_task_files_are_one_line_errors(tmp_path, body, rows, message):
    path = _task(tmp_path, body, rows)
    with pytest.raises(ConfigError, match=message):
        items(load_task(str(path)))


def test_bad_eval_arguments_fail_before_the_model_loads(tmp_path):
    for args, message in ((["--tasks", "nope"], "unknown task 'nope'"),
                          (["--limit", "0"], "Invalid value for '--limit'"),
                          (["--recipe", str(tmp_path / "absent.json")], "cannot read recipe"),
                          (["--tasks", str(tmp_path / "absent.yaml")], "does not exist")):
        out = subprocess.run([sys.executable, "-m", "actlab.cli", "eval", "--model", "no/such-model", *args],
                             capture_output=True, text=True)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()


def test_every_recipe_column_sees_the_same_items(tiny_llama, tmp_path):
    from actlab.transforms.steer import InterventionRecipe, SiteEdit

    spec = load_task(str(_task(tmp_path, MINE, ROWS)))
    push = InterventionRecipe("manual", tiny_llama.identity.to_dict(),
                              [SiteEdit("L1.resid_out", "add", torch.ones(tiny_llama.adapter.hidden_size), 2.0)])
    result = evaluate(tiny_llama, [spec], [Column(DENSE), Column("push", push)], progress=False, log=lambda *a: None)
    a, b = (c.results["mine"] for c in result.columns)
    assert [r["index"] for r in a.records] == [r["index"] for r in b.records]
    assert a.records[0]["loglikelihoods"] != b.records[0]["loglikelihoods"]
    d, se = result.difference(result.columns[1], "mine", "acc")
    assert d == pytest.approx(b.metrics["acc"][0] - a.metrics["acc"][0])
    assert "Δ push" in result.table()


def test_column_names_keep_the_budget_in_a_recipe_file_name():
    from actlab.jobs.eval import column_names

    names = column_names(["a/la-0.5.json", "b/la-0.5.yaml", "drop.L3.yml", "dense.json", "odd.txt"])
    assert names == ["la-0.5", "la-0.5-2", "drop.L3", "dense-2", "odd.txt"]


# -- the built-in tasks on the shared data -----------------------------------------------------------

def test_builtin_tasks_read_the_shared_files():
    root = shared_data("tasks")
    assert set(task_names()) >= {"wikitext2", "lambada", "arc_easy", "arc_challenge", "piqa", "hellaswag"}
    first = json.loads((root / "arc" / "ARC-Easy-Test.jsonl").read_text().splitlines()[0])
    arc = items(load_task("arc_easy"), 5)
    assert len(arc) == 5 and arc[0].contexts == (f"Question: {first['question']['stem']}\nAnswer:",)
    assert [c["label"] for c in first["question"]["choices"]][arc[0].target] == first["answerKey"]
    piqa = items(load_task("piqa"))
    labels = (root / "piqa" / "valid-labels.lst").read_text().split()
    assert len(piqa) == len(labels) == 1838 and [p.target for p in piqa[:50]] == [int(x) for x in labels[:50]]
    hella = read_docs(load_task("hellaswag"))
    assert len(hella) == 10042 and {d["label"] for d in hella} == {"0", "1", "2", "3"}
    lambada = items(load_task("lambada"), 3)
    text = json.loads((root / "lambada" / "lambada_test.jsonl").read_text().splitlines()[0])["text"]
    assert lambada[0].contexts[0] + lambada[0].continuations[0] == text
    assert lambada[0].continuations[0] == " " + text.split(" ")[-1]


def test_speed_column_per_recipe(tiny_llama, tmp_path):
    """--speed: decode tokens/s and engine memory where the engine runs the recipe, the reason where it cannot."""
    from actlab.jobs.eval import decode_speed
    from actlab.transforms.layers import LayerRecipe
    from actlab.transforms.steer import InterventionRecipe, SiteEdit

    dense = decode_speed(tiny_llama, None, log=lambda *a: None, tokens=8, reps=1)
    dropped = decode_speed(tiny_llama, LayerRecipe("m", tiny_llama.identity.to_dict(), ["L1"]), log=lambda *a: None,
                           tokens=8, reps=1)
    assert dense["decode_tok_s"] > 0 and dropped["engine_mb"] < dense["engine_mb"]
    # prefill: HF with the removed block skipped (the dense time is reused where given); others: dense only
    assert dense["dense_prefill_s"] > 0 and "prefill_s" not in dense and dropped["prefill_s"] > 0
    assert dropped["prefill_speedup"] == pytest.approx(dropped["dense_prefill_s"] / dropped["prefill_s"])
    again = decode_speed(tiny_llama, LayerRecipe("m", tiny_llama.identity.to_dict(), ["L0.attn"]), tokens=8, reps=1,
                         log=lambda *a: None, dense_prefill_s=0.5)
    assert again["dense_prefill_s"] == 0.5 and again["prefill_s"] > 0
    push = InterventionRecipe("m", tiny_llama.identity.to_dict(), [SiteEdit("L0.resid_out", "zero")])
    assert decode_speed(tiny_llama, push, log=lambda *a: None, tokens=8, reps=1)["decode_tok_s"] > 0
    heads = InterventionRecipe("m", tiny_llama.identity.to_dict(), [SiteEdit("L0.o_in", "zero", heads=[0])])
    assert "residual stream" in decode_speed(tiny_llama, heads, log=lambda *a: None)["error"]


def test_an_interrupted_evaluation_resumes_to_the_same_results(tiny_llama, tmp_path, monkeypatch):
    """Killed after its second (column, task) result, `actlab eval` run again with the same arguments keeps those
    and computes the rest: the same table as one uninterrupted run. Other arguments into the directory: refused."""
    from actlab.jobs import eval as job
    from actlab.transforms.steer import InterventionRecipe, SiteEdit

    recipe = tmp_path / "push.json"
    InterventionRecipe("manual", tiny_llama.identity.to_dict(),
                       [SiteEdit("L1.resid_out", "add", torch.ones(tiny_llama.adapter.hidden_size), 2.0)]).save(recipe)
    tasks = f"{_task(tmp_path, MINE, ROWS)},lambada"
    args = dict(model="tiny-llama", recipes=[str(recipe)], tasks=tasks, limit=4, progress=False)
    whole = job.eval_job(**args, out=str(tmp_path / "whole"), log=lambda *a: None)

    saved = job.EvalCheckpoint.save

    def save_then_die(self, column, result):
        saved(self, column, result)
        if sum(len(t) for t in self.state["done"].values()) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(job.EvalCheckpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        job.eval_job(**args, out=str(tmp_path / "resumed"), log=lambda *a: None)
    monkeypatch.setattr(job.EvalCheckpoint, "save", saved)
    lines: list[str] = []
    resumed = job.eval_job(**args, out=str(tmp_path / "resumed"), log=lines.append)
    assert sum("kept from an earlier run" in line for line in lines) == 2
    assert resumed.table() == whole.table()
    for a, b in zip(whole.columns, resumed.columns):
        assert {t: r.records for t, r in a.results.items()} == {t: r.records for t, r in b.results.items()}
    assert (tmp_path / "resumed" / "compare.html").is_file()
    with pytest.raises(ConfigError, match="other limit"):
        job.eval_job(**{**args, "limit": 3}, out=str(tmp_path / "resumed"), log=lambda *a: None)


def test_an_evaluation_directory_grows_with_more_recipes_and_tasks(tiny_llama, tmp_path):
    """More recipes and tasks into the same --out: the cells an earlier run finished are read back, not recomputed,
    and the table equals one evaluation of the whole grid in a new directory; a column whose recipe file changed
    is refused; a state file of the layout before growth is read."""
    from actlab.jobs import eval as job
    from actlab.transforms.steer import InterventionRecipe, SiteEdit

    def push(path, scale):
        InterventionRecipe("manual", tiny_llama.identity.to_dict(),
                           [SiteEdit("L1.resid_out", "add", torch.ones(tiny_llama.adapter.hidden_size), scale)]
                           ).save(path)
        return str(path)

    first, second = push(tmp_path / "push.json", 2.0), push(tmp_path / "pull.json", -2.0)
    mine = str(_task(tmp_path, MINE, ROWS))
    quiet = lambda *a: None  # noqa: E731
    job.eval_job("tiny-llama", [first], tasks=mine, limit=4, out=str(tmp_path / "grown"), progress=False, log=quiet)
    lines: list[str] = []
    grown = job.eval_job("tiny-llama", [first, second], tasks=f"{mine},lambada", limit=4, out=str(tmp_path / "grown"),
                         progress=False, log=lines.append)
    assert sorted(line.split(":")[0] for line in lines if "kept from an earlier run" in line) == ["dense", "push"]
    whole = job.eval_job("tiny-llama", [first, second], tasks=f"{mine},lambada", limit=4, out=str(tmp_path / "whole"),
                         progress=False, log=quiet)
    assert grown.table() == whole.table()
    # the earlier grid alone, from the grown directory: every cell kept, nothing computed
    lines.clear()
    job.eval_job("tiny-llama", [first], tasks=mine, limit=4, out=str(tmp_path / "grown"), progress=False,
                 log=lines.append)
    assert any("2 (column, task) results kept" in line for line in lines)
    assert sum("kept from an earlier run" in line for line in lines) == 2
    push(tmp_path / "push.json", 3.0)
    with pytest.raises(ConfigError, match="column push from another recipe file"):
        job.eval_job("tiny-llama", [first], tasks=mine, limit=4, out=str(tmp_path / "grown"), log=quiet)
    # the layout before growth: one fingerprint with lists
    state_file = tmp_path / "whole" / job.EvalCheckpoint.FILE
    state = json.loads(state_file.read_text())
    old = {k: v for k, v in state.items() if k not in ("model", "limit", "tasks", "recipes")}
    old["fingerprint"] = {"model": state["model"], "limit": state["limit"],
                          "tasks": [{"task": t, **v} for t, v in state["tasks"].items()],
                          "columns": [{"name": n, "recipe": r} for n, r in state["recipes"].items()]}
    state_file.write_text(json.dumps(old))
    lines.clear()
    again = job.eval_job("tiny-llama", [str(tmp_path / "pull.json")], tasks="lambada", limit=4,
                         out=str(tmp_path / "whole"), progress=False, log=lines.append)
    assert sum("kept from an earlier run" in line for line in lines) == 2
    assert [c.name for c in again.columns] == ["dense", "pull"]
