"""Calibration data-parallel: 2 processes on gloo (`--nproc 2`, each reading its block of the calibration
windows, statistics summed across ranks) give the recipe 1 process gives, for every family: activation
sparsity (score histograms, gradient energies, per-channel moments, the variant chosen by calibration loss),
layer removal (measured losses, repair moments), mixed-precision quantization (input moments, the LM head's
moment and gradient) and KV budgets (loss estimates, scenario losses)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from actlab.transforms import load_recipe

COMMON = ["--model", "tiny-llama", "--seq-len", "64", "--calib-windows", "8"]


def _run(args, cwd, cache):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACTLAB_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-m", "actlab", *args], cwd=cwd, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def one_and_two(tmp_path, args, name):
    """The recipe of one process and of two (separate caches: nothing computed by one is read by the other)."""
    for n in (1, 2):
        _run([*args, *COMMON, "--save", f"{name}{n}.json", *(["--nproc", "2"] if n == 2 else [])], tmp_path,
             tmp_path / f"cache{n}")
    return load_recipe(str(tmp_path / f"{name}1.json")), load_recipe(str(tmp_path / f"{name}2.json"))


def close(a, b, where=""):
    if torch.is_tensor(a):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=where)
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), where
    else:
        assert a == b, where


# loss-aware: score histograms and gradient energies; stat-topk: per-channel moments and the variant chosen by
# calibration loss (CHESS reads the same moments)
@pytest.mark.parametrize("method", ["loss-aware", "stat-topk"])
def test_sparsity_calibrated_on_two_processes_is_the_recipe_of_one(tmp_path, method):
    one, two = one_and_two(tmp_path, ["sparsify", "--method", method, "--sparsity", "0.4", "--windows", "2"], method)
    assert one.rules.keys() == two.rules.keys()
    for key in one.rules:
        close(vars(one.rules[key]), vars(two.rules[key]), key)


def test_layers_quant_and_kv_calibrated_on_two_processes_are_the_recipes_of_one(tmp_path):
    one, two = one_and_two(tmp_path, ["layers", "--method", "joint:rank=4", "--budget", "0.2"], "joint")
    assert one.drop == two.drop
    close(one.repair, two.repair, "repair")
    close(one.calibration["steps"], two.calibration["steps"], "steps")
    one, two = one_and_two(tmp_path, ["quant", "--method", "mixed", "--avg-bits", "5", "--group", "32", "--head"],
                           "mixed")
    assert {k: e["bits"] for k, e in one.weights.items()} == {k: e["bits"] for k, e in two.weights.items()}
    for phase in ("prefill", "decode"):  # decode: the running scenario (each rank reads its windows chunked)
        one, two = one_and_two(tmp_path, ["kv", "--method", "loss-aware", "--phase", phase, "--ratio", "0.5"],
                               f"kv-{phase}")
        close(one.head_ratios, two.head_ratios, "head_ratios")
        close(one.calibration["measured_loss"], two.calibration["measured_loss"], "measured_loss")
