"""Mind the testbed: SmolLM2-135M was published as GGUF Q4_1 (4-bit, asymmetric, groups of 32) and is dequantized
to float32, so round-to-nearest on that grid must give its weights back exactly, and its GGUF block type must be
Q4_1 in the file it came from (read independently with the `gguf` package)."""

from __future__ import annotations

import pytest
import torch

from actlab.models.cache import downloads_dir
from actlab.transforms.quant import NoCalibration, get_method
from actlab.transforms.quant.recipe import effective_weight

pytestmark = pytest.mark.real


def test_rtn_on_the_source_grid_rebuilds_smollm2_exactly(smollm2):
    import gguf

    source = downloads_dir() / smollm2.provenance["gguf"].split("/")[-1]
    if not source.is_file():
        pytest.skip(f"the source GGUF {source} is not in the download cache")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(source)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["blk.29.ffn_down.weight"] == "Q4_1"
    recipe = get_method("rtn", bits=4, group=32).calibrate(NoCalibration(smollm2))
    for layer in smollm2.adapter.layers:
        for role, view in layer.linears.items():
            w = view.weight().detach().float()
            assert torch.equal(effective_weight(recipe.weights[f"L{layer.index}.{role}"]), w), (layer.index, role)
    other = get_method("rtn", bits=4, group=64).calibrate(NoCalibration(smollm2))
    assert not torch.equal(effective_weight(other.weights["L0.q"]), smollm2.adapter.layers[0].linears["q"].weight())
