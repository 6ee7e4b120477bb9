"""Layer importance and depth-pruning methods, checked against independent computations: the depth statistics
against hidden states captured with plain module hooks, the measured loss against a model built without the
part, every method's choice against a brute force over its own criterion, and the repair against least squares
solved by numpy."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import actlab
from actlab.calib import CalibrationSet
from actlab.errors import ConfigError
from actlab.transforms import attach, cost_of
from actlab.transforms.layers import METHODS, LayerRecipe, get_method, removed_fraction
from actlab.transforms.layers.importance import (
    block_params,
    calibration_loss,
    depth_statistics,
    part_params,
    take_until,
)
from actlab.transforms.layers.repair import PreparedRepair, RepairMoments, apply_repair, fit_repair, repair_params

from .test_layers import built_without


@pytest.fixture(scope="module")
def lm():
    return actlab.load_model("tiny-llama")


@pytest.fixture
def calib(lm, tmp_cache):
    g = torch.Generator().manual_seed(0)
    return CalibrationSet(lm, torch.randint(5, 250, (3, 48), generator=g), {"name": "random", "sha256": "r0"},
                          {"seq_len": 48})


def sublayer_io(lm, windows, part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A sublayer's input (the normed stream its module reads) and output, [tokens, d], with a plain forward hook
    on its HF module (the dense model)."""
    index, sub = part.split(".")
    module = getattr(lm.adapter.layers[int(index[1:])], sub)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(m, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append((x.reshape(-1, x.shape[-1]), (out[0] if isinstance(out, tuple) else out).reshape(-1, x.shape[-1])))

    handle = module.register_forward_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            for w in windows:
                lm.model(input_ids=w[None], use_cache=False)
    finally:
        handle.remove()
    return torch.cat([u for u, _ in seen]), torch.cat([y for _, y in seen])


def hidden_states(lm, windows):
    """Each block's input and the last block's output, [L+1, tokens, d], with plain forward hooks."""
    layers = lm.adapter.layers
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers) + 1)}
    handles = [layer.module.register_forward_pre_hook(
        lambda m, args, kwargs, i=layer.index: seen[i].append(
            (args[0] if args else kwargs["hidden_states"]).reshape(-1, lm.adapter.hidden_size)), with_kwargs=True)
        for layer in layers]
    handles.append(layers[-1].module.register_forward_hook(
        lambda m, a, out: seen[len(layers)].append((out[0] if isinstance(out, tuple) else out)
                                                   .reshape(-1, lm.adapter.hidden_size))))
    try:
        with torch.no_grad():
            for w in windows:
                lm.model(w[None])
    finally:
        for h in handles:
            h.remove()
    return torch.stack([torch.cat(seen[i]) for i in range(len(layers) + 1)]).double()


def mean_nll(model, windows):
    with torch.no_grad():
        losses = [F.cross_entropy(model(w[None]).logits[0, :-1].double(), w[1:], reduction="sum") for w in windows]
    return float(sum(losses)) / (windows.shape[0] * (windows.shape[1] - 1))


def test_depth_statistics_equal_a_brute_force_over_hidden_states(lm, calib):
    h = hidden_states(lm, calib.windows)
    stats = depth_statistics(calib)
    cos_next = F.cosine_similarity(h[:-1], h[1:], dim=-1).mean(-1)
    torch.testing.assert_close(stats.block_influence.double(), 1 - cos_next, atol=1e-5, rtol=0)
    depths = h.shape[0]
    for a in range(depths):
        for b in range(a + 1, depths):
            cos = F.cosine_similarity(h[a], h[b], dim=-1).clamp(-1, 1)
            assert float(stats.angular[a, b]) == pytest.approx(float(torch.arccos(cos).mean() / math.pi), abs=1e-5)


def test_measured_loss_equals_a_model_built_without_the_part(lm, calib):
    dense = calibration_loss(calib)
    assert dense == pytest.approx(mean_nll(lm.model, calib.windows), rel=1e-6)
    assert calibration_loss(calib, ["L1"]) == pytest.approx(mean_nll(built_without(lm, 1), calib.windows), rel=1e-5)
    zeroed = copy.deepcopy(lm.model)
    with torch.no_grad():
        zeroed.model.layers[0].mlp.down_proj.weight.zero_()
        zeroed.model.layers[2].self_attn.o_proj.weight.zero_()
    assert calibration_loss(calib, ["L0.mlp", "L2.attn"]) == pytest.approx(mean_nll(zeroed, calib.windows), rel=1e-5)


def test_budget_counts_the_projections_of_the_removed_parts(lm):
    state = lm.model.state_dict()
    per_layer = {i: sum(v.numel() for k, v in state.items() if f"layers.{i}." in k and k.endswith("proj.weight"))
                 for i in range(lm.adapter.num_layers)}
    attn = sum(v.numel() for k, v in state.items() if "layers.1.self_attn" in k and k.endswith("proj.weight"))
    assert block_params(lm.adapter) == sum(per_layer.values())
    assert part_params(lm.adapter, "L1.attn") == attn
    assert part_params(lm.adapter, "L1.mlp") == per_layer[1] - attn
    assert removed_fraction(lm.adapter, ["L0", "L1.attn"]) == pytest.approx(
        (per_layer[0] + attn) / sum(per_layer.values()))
    cost = cost_of(lm, LayerRecipe("manual", lm.identity.to_dict(), ["L0"]))
    assert cost.params == cost.dense_params - per_layer[0]  # a block's norms are not counted as removable
    assert take_until(["L2", "L0", "L1"], lm.adapter, 0.3, "x") == ["L2"]
    assert take_until(["L2", "L0", "L1"], lm.adapter, 0.0, "x") == []
    with pytest.raises(ConfigError, match="every layer"):
        take_until(["L2", "L0", "L1"], lm.adapter, 0.9, "removing blocks")


def test_shortgpt_and_gromov_choose_by_their_criteria(lm, calib):
    h = hidden_states(lm, calib.windows)
    bi = 1 - F.cosine_similarity(h[:-1], h[1:], dim=-1).mean(-1)
    short = get_method("shortgpt").calibrate(calib, 0.3)
    assert short.drop == [f"L{int(bi.argmin())}"]
    gromov = get_method("gromov").calibrate(calib, 0.5)  # two of three blocks
    distance = {s: float(torch.arccos(F.cosine_similarity(h[s], h[s + 2], dim=-1).clamp(-1, 1)).mean())
                for s in range(2)}
    best = min(distance, key=distance.get)
    assert gromov.drop == [f"L{best}", f"L{best + 1}"]


def test_llm_drop_ranks_sublayers_by_how_little_they_turn_the_stream(lm, calib):
    from actlab.probe import Probe

    with Probe(lm, "L*.resid_in,L*.resid_mid,L*.resid_out") as probe, torch.no_grad():
        for w in calib.windows:
            lm.model(w[None])
    cache = {k: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]).double() for k, v in probe.cache.items()}
    n = lm.adapter.num_layers
    attn = [1 - float(F.cosine_similarity(cache[f"L{i}.resid_in"], cache[f"L{i}.resid_mid"], dim=-1).mean())
            for i in range(n)]
    recipe = get_method("attn-drop").calibrate(calib, 0.15)
    assert recipe.drop == [f"L{i}.attn" for i in np.argsort(attn)[:len(recipe.drop)]] and len(recipe.drop) >= 2


def test_sleb_takes_the_cheapest_block_by_brute_force(lm, calib):
    recipe = get_method("sleb").calibrate(calib, 0.3)
    brute = {i: mean_nll(built_without(lm, i), calib.windows) for i in range(lm.adapter.num_layers)}
    assert recipe.drop == [f"L{min(brute, key=brute.get)}"]
    assert recipe.calibration["steps"][0]["loss"] == pytest.approx(min(brute.values()), rel=1e-5)


@pytest.mark.parametrize("repair", ["none", "mean", "linear"])
def test_joint_meets_its_net_budget_and_records_the_loss_it_reaches(lm, calib, repair):
    recipe = get_method("joint", repair=repair, rank=8).calibrate(calib, 0.3)
    assert all("." in p for p in recipe.drop)
    saved = sum(part_params(lm.adapter, p) for p in recipe.drop) - sum(repair_params(r) for r in recipe.repair.values())
    assert saved / block_params(lm.adapter) >= 0.3
    assert recipe.calibration["net_removed_fraction"] == pytest.approx(saved / block_params(lm.adapter))
    assert set(recipe.repair) == (set() if repair == "none" else set(recipe.drop))
    # repairs are fitted on the last two windows and the loss measured on the first (nothing to fit: all three)
    measure = calib.windows[:1] if repair != "none" else calib.windows
    assert (recipe.calibration["measure_windows"], recipe.calibration["fit_windows"]) == \
        ((1, 2) if repair != "none" else (3, 0))
    assert recipe.calibration["loss"] == pytest.approx(calibration_loss(calib, recipe.drop, measure,
                                                                        repair=recipe.repair), rel=1e-6)
    if repair == "linear":  # the first step's repairs: least squares on the fitting windows only
        part = recipe.drop[0]
        u, y = sublayer_io(lm, calib.windows[1:], part)
        for name, tensor in fit_repair(u, y, "linear", rank=8).items():
            torch.testing.assert_close(recipe.repair[part][name], tensor, rtol=1e-3, atol=1e-5)
    # the greedy step is the best per parameter among all first candidates (checked by brute force)
    first = recipe.calibration["steps"][0]["removed"]
    if repair == "none":
        dense = calibration_loss(calib)
        scores = {p: (calibration_loss(calib, [p]) - dense) / part_params(lm.adapter, p)
                  for p in [f"L{i}.{s}" for i in range(lm.adapter.num_layers) for s in ("attn", "mlp")]}
        assert first == min(scores, key=scores.get)


def test_repair_fit_equals_least_squares_and_streams():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(400, 12, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, 12, dtype=torch.float64)
    truth = torch.randn(12, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 10, generator=g, dtype=torch.float64)
    y = u @ truth + 0.7 + 0.01 * torch.randn(400, 10, generator=g, dtype=torch.float64)
    fit = fit_repair(u, y, "linear", rank=3, ridge=0.0)
    # numpy: centred least squares, then the rank-3 truncation of the fitted values
    un, yn = u.numpy() - u.numpy().mean(0), y.numpy() - y.numpy().mean(0)
    a = np.linalg.lstsq(un, yn, rcond=None)[0]
    _, _, vt = np.linalg.svd(un @ a, full_matrices=False)
    a3 = a @ vt[:3].T @ vt[:3]
    predicted = un @ a3 + y.numpy().mean(0)
    np.testing.assert_allclose(apply_repair(u.float(), fit).double().numpy(), predicted, atol=1e-4)
    halves = RepairMoments()
    halves.add(u[:150], y[:150])
    halves.add(u[150:], y[150:])
    for name, t in halves.fit("linear", 3, 0.0).items():
        torch.testing.assert_close(t, fit[name], atol=1e-5, rtol=1e-5)
    mean = fit_repair(u, y, "mean")
    torch.testing.assert_close(apply_repair(u.float(), mean), y.mean(0).float().expand(400, 10))
    assert repair_params(fit) == 12 + 12 * 3 + 3 * 10 + 10
    # the engine's form (the mean folded into the bias, one token at a time) computes the same map
    for repair in (fit, mean):
        prepared, x = PreparedRepair(repair), u.float()
        expected = apply_repair(x, repair)
        torch.testing.assert_close(torch.stack([prepared(row) for row in x[:20]]), expected[:20], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(prepared(x), expected, atol=1e-5, rtol=1e-5)


def test_a_repaired_sublayer_computes_its_fitted_map_of_the_sublayer_input(lm, tmp_path):
    g = torch.Generator().manual_seed(2)
    d = lm.adapter.hidden_size
    rep = fit_repair(torch.randn(64, d, generator=g), torch.randn(64, d, generator=g), "linear", rank=4)
    recipe = LayerRecipe("manual", lm.identity.to_dict(), ["L1.mlp", "L2"], repair={"L1.mlp": rep, "L2": rep})
    ids = torch.arange(5, 35)[None]
    with attach(lm, recipe), torch.no_grad():
        hooked = lm.model(ids).logits
    # independently: replace the MLP's output by g(its input) and block 2 by x + g(x) with module hooks
    model = copy.deepcopy(lm.model)
    model.model.layers[1].mlp.register_forward_hook(lambda m, args, out: apply_repair(args[0], rep))

    def block(m, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        new = x + apply_repair(x, rep)
        return (new, *out[1:]) if isinstance(out, tuple) else new
    model.model.layers[2].register_forward_hook(block, with_kwargs=True)
    with torch.no_grad():
        torch.testing.assert_close(hooked, model(ids).logits, atol=1e-5, rtol=1e-5)
    path = tmp_path / "rep.json"
    recipe.save(path)
    loaded = LayerRecipe.load(path)
    assert "L1.mlp" in loaded.repair and loaded.describe() == recipe.describe()
    with attach(lm, loaded), torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, hooked)
    cost = cost_of(lm, recipe)
    assert cost.params == cost.dense_params - part_params(lm.adapter, "L1.mlp") - part_params(lm.adapter, "L2") \
        + 2 * repair_params(rep)
    assert recipe.export_hf(lm) == "runtime"


def test_bad_layer_input_is_a_one_line_error(lm, calib, tmp_path):
    rep = fit_repair(torch.randn(8, 64), torch.randn(8, 64), "mean")
    with pytest.raises(ConfigError, match="not removed"):
        LayerRecipe("manual", lm.identity.to_dict(), ["L1"], repair={"L2": rep})
    with pytest.raises(ConfigError, match="every block|every layer"):
        get_method("shortgpt").calibrate(calib, 0.95)
    with pytest.raises(ConfigError, match="every"):
        get_method("sleb").calibrate(calib, 0.95)
    with pytest.raises(ConfigError, match="unknown layer method"):
        get_method("nope")
    with pytest.raises(ConfigError, match="repair must be"):
        get_method("joint", repair="magic")
    save = tmp_path / "r.json"
    for args, message in [(["--method", "shortgpt", "--budget", "1.0"], "in [0, 1)"),
                          (["--method", "shortgpt"], "needs --budget"),
                          (["--method", "nope", "--budget", "0.2"], "unknown layer method"),
                          (["--remove", "L9"], "out of range"),
                          (["--remove", "L0,L1,L2"], "removing all 3 blocks"),
                          (["--remove", "L1", "--method", "sleb", "--budget", "0.2"], "either --remove")]:
        run = subprocess.run([sys.executable, "-m", "actlab.cli", "layers", "--model", "tiny-llama", "--save",
                              str(save), *args], capture_output=True, text=True)
        assert run.returncode != 0 and message in run.stderr, (args, run.stderr)
        assert run.stderr.strip().splitlines()[-1].startswith("error:")
        assert not save.exists()


def test_every_method_through_the_cli_writes_a_recipe_actlab_eval_takes(tmp_path, tmp_cache):
    rows = json.loads(subprocess.run([sys.executable, "-m", "actlab.cli", "layers", "--list-methods", "--json"],
                                     capture_output=True, text=True, check=True).stdout)
    assert [r["method"] for r in rows] == list(METHODS)
    out = tmp_path / "j.json"
    run = subprocess.run([sys.executable, "-m", "actlab.cli", "layers", "--model", "tiny-llama", "--method",
                          "joint:repair=mean", "--budget", "0.2", "--seq-len", "64", "--calib-windows", "8",
                          "--windows", "2", "--save", str(out), "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["method"] == "joint" and summary["removed_fraction"] >= 0.2 and out.is_file()
    assert LayerRecipe.load(out).drop == summary["drop"]
    assert summary["ppl"] > 0 and summary["calib_loss"] > 0


def test_the_layers_job_extends_a_recipe_and_resumes_an_interrupted_calibration(tmp_path, tmp_cache):
    """`--extend` and a checkpoint left beside --save both give the recipe a calibration from nothing gives, the
    checkpoint goes once the recipe is saved, and one that does not fit is a clear error."""
    import shutil

    from actlab.jobs.layers import layers_job, partial_path
    from actlab.transforms.io import sidecar_path

    def job(budget, save, method="joint", **kw):
        return layers_job("tiny-llama", method=method, params={"rank": 4} if method == "joint" else {},
                          budget=budget, seq_len=64, calib_windows=8, save=str(tmp_path / save), progress=False, **kw)

    job(0.2, "small.json")
    job(0.5, "whole.json")
    whole = LayerRecipe.load(tmp_path / "whole.json")
    job(0.5, "extended.json", extend=str(tmp_path / "small.json"))
    assert_same_calibration(LayerRecipe.load(tmp_path / "extended.json"), whole)

    partial = partial_path(str(tmp_path / "resumed.json"))
    assert partial.name == "resumed.partial.json"
    shutil.copy(tmp_path / "small.json", partial)
    shutil.copy(sidecar_path(tmp_path / "small.json"), sidecar_path(partial))
    said: list[str] = []
    job(0.5, "resumed.json", log=said.append)
    assert any("resuming an interrupted calibration" in line for line in said)
    assert_same_calibration(LayerRecipe.load(tmp_path / "resumed.json"), whole)
    assert not partial.exists() and not sidecar_path(partial).exists()

    job(0.2, "sleb.json", method="sleb")
    shutil.copy(tmp_path / "sleb.json", partial)
    with pytest.raises(ConfigError, match="left from an interrupted calibration"):
        job(0.5, "resumed.json")
    with pytest.raises(ConfigError, match="give --method"):
        layers_job("tiny-llama", remove="L1", save=str(tmp_path / "x.json"), extend=str(tmp_path / "small.json"))


@pytest.mark.parametrize("name", sorted(actlab.models.tiny.TINY_CONFIGS))
def test_methods_run_on_every_family(name, tmp_cache):
    lm = actlab.load_model(name)
    windows = torch.randint(5, 200, (2, 32), generator=torch.Generator().manual_seed(3))
    calib = CalibrationSet(lm, windows, {"name": "random", "sha256": "r1"}, {"seq_len": 32})
    stats = depth_statistics(calib)
    assert torch.isfinite(stats.block_influence).all() and torch.isfinite(stats.angular[0, 1:]).all()
    for method in ("shortgpt", "gromov"):
        recipe = get_method(method).calibrate(calib, 0.2)
        assert removed_fraction(lm.adapter, recipe.drop) >= 0.2
    joint = get_method("joint", repair="linear", rank=4).calibrate(calib, 0.2)
    assert joint.calibration["loss"] == pytest.approx(calibration_loss(calib, joint.drop, windows[:1],
                                                                       repair=joint.repair), rel=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-gpt-neox", "tiny-phi3"])
def test_engine_runs_repairs_like_the_hooked_model(name):
    from actlab.engine import DecodeEngine
    from actlab.engine.reference import greedy_reference, prompt_ids

    lm = actlab.load_model(name)
    g = torch.Generator().manual_seed(4)
    d = lm.adapter.hidden_size

    def rep(scale):
        return fit_repair(torch.randn(256, d, generator=g), scale * torch.randn(256, d, generator=g) + scale,
                          "linear", rank=4)
    n = lm.adapter.num_layers
    parts = [f"L{n - 1}", "L0.attn", f"L{n - 2}.mlp"]
    repairs = dict(zip(parts, (rep(0.5), rep(1.0), rep(1.0))))
    recipe = LayerRecipe("manual", lm.identity.to_dict(), parts, repair=repairs)
    ids = prompt_ids(lm, 16)
    with attach(lm, recipe):
        reference = greedy_reference(lm, ids, 24)
    plain = greedy_reference(lm, ids, 24)
    tokens = DecodeEngine(lm, recipe, max_len=64).generate(ids, 24).tokens
    assert tokens == reference and tokens != plain


def test_importance_table_ranks_every_part_and_measures_agreement(lm, calib):
    from actlab.transforms.layers.importance import importance_table

    table, agreement = importance_table(calib)
    assert len(table) == 3 * lm.adapter.num_layers
    dense = calibration_loss(calib)
    row = table.set_index("part").loc["L1.mlp"]
    assert row["delta_loss"] == pytest.approx(calibration_loss(calib, ["L1.mlp"]) - dense, rel=1e-6)

    def spearman(a, b):  # no ties in these continuous numbers: Pearson of the ranks
        ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
        return float(np.corrcoef(ra, rb)[0, 1])
    blocks = table[table["kind"] == "block"]
    assert agreement["block: influence"] == pytest.approx(spearman(blocks["influence"], blocks["delta_loss"]))
    assert set(agreement) == {"block: influence", "block: angular distance", "attn: influence", "mlp: influence"}


@pytest.mark.parametrize("method", ["sleb", "joint"])
def test_a_greedy_recipe_for_a_smaller_budget_is_a_prefix_of_a_larger_one(lm, calib, method):
    """The prefix taken from a recipe for 0.6 equals calibrating for the smaller budget directly (same parts,
    repairs and losses), and a method that is not greedy, a larger budget or another method's recipe is refused."""
    chosen = get_method(method, **({"rank": 4} if method == "joint" else {}))
    large = chosen.calibrate(calib, 0.6)
    for target in (0.0, 0.2, 0.4):
        direct = chosen.calibrate(calib, target)
        cut = chosen.prefix(large, lm.adapter, target)
        assert cut.drop == direct.drop and cut.target == target
        assert set(cut.repair) == set(direct.repair)
        for part in cut.repair:
            for name, tensor in cut.repair[part].items():
                torch.testing.assert_close(tensor, direct.repair[part][name])
        assert cut.calibration["steps"] == direct.calibration["steps"]
        assert cut.calibration["removed_fraction"] == pytest.approx(direct.calibration["removed_fraction"])
        assert cut.calibration.get("loss") == pytest.approx(direct.calibration.get("loss"))
    with pytest.raises(ConfigError, match="not a prefix"):
        chosen.prefix(large, lm.adapter, 0.7)
    with pytest.raises(ConfigError, match="not greedy"):
        get_method("shortgpt").prefix(large, lm.adapter, 0.2)


def assert_same_calibration(a: LayerRecipe, b: LayerRecipe) -> None:
    assert a.drop == b.drop and a.target == b.target
    assert a.calibration["steps"] == b.calibration["steps"]
    assert a.calibration.get("pending") == b.calibration.get("pending")
    assert a.calibration["loss"] == b.calibration["loss"]
    assert set(a.repair) == set(b.repair)
    for part in a.repair:
        for name, tensor in a.repair[part].items():
            torch.testing.assert_close(tensor, b.repair[part][name], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["sleb", "joint"])
def test_a_continued_greedy_calibration_equals_an_uninterrupted_one(lm, calib, method, tmp_path):
    """Continuing from a recipe for a smaller budget, or from the checkpoint an interrupted calibration left on
    disk, takes the steps (parts, losses, repairs, the lazy scores) calibrating from nothing takes; a start that
    does not fit is refused."""
    params = {"rank": 4} if method == "joint" else {}
    chosen = get_method(method, **params)
    whole = chosen.calibrate(calib, 0.6)
    assert_same_calibration(chosen.calibrate(calib, 0.6, start=chosen.calibrate(calib, 0.2)), whole)

    class Interrupted(Exception):
        pass

    path = tmp_path / "partial.json"

    assert len(whole.drop) >= 2

    def keep_and_stop(recipe):  # what the layers job does, then an interruption before the last step
        recipe.save(path)
        if len(recipe.drop) == len(whole.drop) - 1:
            raise Interrupted

    stopping = get_method(method, **params)
    stopping.checkpoint = keep_and_stop
    with pytest.raises(Interrupted):
        stopping.calibrate(calib, 0.6)
    partial = LayerRecipe.load(path)
    assert partial.drop == whole.drop[:-1]
    assert partial.calibration["removed_fraction"] == pytest.approx(removed_fraction(lm.adapter, partial.drop))
    resumed = chosen.calibrate(calib, 0.6, start=partial)
    assert_same_calibration(resumed, whole)
    # the seconds of the interrupted run travel with its checkpoint and count in the resumed recipe's
    assert 0 < partial.calibration["seconds"] < resumed.calibration["seconds"]

    with pytest.raises(ConfigError, match="more than"):
        chosen.calibrate(calib, 0.2, start=whole)
    other = CalibrationSet(lm, calib.windows[:2], calib.corpus, calib.protocol)
    with pytest.raises(ConfigError, match="another calibration set"):
        chosen.calibrate(other, 0.6, start=partial)
    with pytest.raises(ConfigError, match="not greedy"):
        get_method("shortgpt").calibrate(calib, 0.6, start=partial)
    with pytest.raises(ConfigError, match="is not a"):
        get_method("joint", rank=2).calibrate(calib, 0.6, start=partial if method == "joint" else whole)


@pytest.mark.parametrize("name", sorted(actlab.models.tiny.TINY_CONFIGS))
def test_the_skipping_model_computes_what_the_hooked_recipe_computes(name):
    """Prefill is timed on a copy of the model whose removed sublayers are replaced by their repairs (and removed
    blocks taken out): its logits equal the hooked recipe's, with and without repairs, and a repaired block stays
    as x + g(x)."""
    from actlab.transforms.layers.skip import Skipped, skipping_model

    lm = actlab.load_model(name)
    g = torch.Generator().manual_seed(5)
    d = lm.adapter.hidden_size

    def rep():
        return fit_repair(torch.randn(128, d, generator=g), 0.5 * torch.randn(128, d, generator=g) + 0.3, "linear",
                          rank=3)
    n = lm.adapter.num_layers
    ids = torch.randint(5, 200, (1, 24), generator=g)
    for parts, repaired in (([f"L{n - 1}", "L0.attn"], ["L0.attn"]), ([f"L{n - 1}", "L0.mlp"], [f"L{n - 1}", "L0.mlp"]),
                            (["L0.attn", f"L{n - 1}.mlp"], [])):
        recipe = LayerRecipe("manual", lm.identity.to_dict(), parts, repair={p: rep() for p in repaired})
        if name == "tiny-opt" and any(p.endswith(".mlp") for p in parts):  # fc1 / fc2 sit in the block itself
            with pytest.raises(ConfigError, match="no module for"):
                skipping_model(lm, recipe)
            continue
        model = skipping_model(lm, recipe)
        skipped = [m for m in model.modules() if isinstance(m, Skipped)]
        assert len(skipped) == len(recipe.sublayers()) + (f"L{n - 1}" in repaired)
        with torch.no_grad(), attach(lm, recipe):
            hooked = lm.model(input_ids=ids, use_cache=False).logits
        with torch.no_grad():
            fast = model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(fast, hooked, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        plain = lm.model(input_ids=ids, use_cache=False).logits
    assert not torch.allclose(fast, plain, atol=1e-3)  # the model itself is untouched, and different
