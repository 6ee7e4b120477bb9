"""Models bigger than memory: weights offloaded to disk by accelerate give the results of the model in memory."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import actlab
from actlab.calib import CalibrationSet
from actlab.errors import ConfigError
from actlab.jobs.profile import ProfileOptions, profile
from actlab.models.cache import cache_root
from actlab.models.placement import Placement, is_offloaded, parse_max_memory

from ..conftest import shared_data
from .test_parallel import assert_same_tables

FAR_TOO_SMALL = Placement(max_memory="cpu=10KB")  # every module goes to disk


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gemma3"])
def saved(request, tmp_path_factory):
    lm = actlab.load_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def test_max_memory_and_device_map_parse_or_fail_in_one_line():
    assert parse_max_memory("cpu=2GiB, 0=20GiB") == {"cpu": "2GiB", 0: "20GiB"}
    for bad in ("cpu", "cpu=lots", "gpu0=1GB", ","):
        with pytest.raises(ConfigError, match="--max-memory"):
            parse_max_memory(bad)
    with pytest.raises(ConfigError, match="--device-map"):
        Placement(device_map="everywhere")
    with pytest.raises(ConfigError, match="built in memory"):
        actlab.load_model("tiny-llama", placement=FAR_TOO_SMALL)
    out = subprocess.run([sys.executable, "-m", "actlab", "--max-memory", "cpu=x", "ppl"], capture_output=True,
                         text=True)
    assert out.returncode == 2 and out.stderr.strip().startswith("error: --max-memory")
    assert "Traceback" not in out.stderr


def test_an_offloaded_model_is_the_same_model_with_the_same_outputs(saved):
    memory = actlab.load_model(str(saved))
    disk = actlab.load_model(str(saved), placement=FAR_TOO_SMALL)
    assert is_offloaded(disk.model) and not is_offloaded(memory.model)
    assert disk.provenance["placement"]["devices"] == ["disk"] and disk.device == torch.device("cpu")
    assert not disk.identity.differences(memory.identity)  # recipes and runs of one are accepted by the other
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        torch.testing.assert_close(disk.model(input_ids=ids).logits, memory.model(input_ids=ids).logits)


def test_profile_and_calibration_offloaded_equal_in_memory(saved, tmp_path, monkeypatch):
    shared_data("wikitext-2")
    runs = {}
    kernels = cache_root() / "build"
    kernels.mkdir(parents=True, exist_ok=True)
    for name, placement in (("memory", Placement()), ("disk", FAR_TOO_SMALL)):
        cache = tmp_path / f"cache-{name}"  # nothing calibrated is shared; the compiled kernels are
        cache.mkdir()
        (cache / "build").symlink_to(kernels, target_is_directory=True)
        monkeypatch.setenv("ACTLAB_CACHE", str(cache))
        lm = actlab.load_model(str(saved), placement=placement)
        profile(str(saved), "wikitext2:valid", tmp_path / name, tokens=256, seq_len=64, lm=lm, progress=False,
                options=ProfileOptions(query_stride=4, lens_stride=8), log=lambda *a: None)
        calib = CalibrationSet.from_corpus(lm, "wikitext2:valid", seq_len=64, windows=8)
        runs[name] = ([actlab.sparsify(lm, method, 0.4, calib=calib) for method in ("cats", "wina")],
                      calib.input_grad_rms(windows=2, progress=False))  # a backward pass through disk weights
    assert_same_tables(tmp_path / "memory", tmp_path / "disk")
    (recipes, grads), (recipes_disk, grads_disk) = runs["memory"], runs["disk"]
    for a, b in zip(recipes, recipes_disk):  # histograms of activations; wina's weight-column norms
        assert a.method == b.method and a.rules.keys() == b.rules.keys()
        for key in a.rules:
            assert a.rules[key].threshold == pytest.approx(b.rules[key].threshold, rel=1e-6), key
    assert grads.keys() == grads_disk.keys() and grads
    for key in grads:
        torch.testing.assert_close(grads[key], grads_disk[key], rtol=1e-5, atol=1e-8)
