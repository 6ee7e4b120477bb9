"""Weight swaps: the replacement computes, the original object comes back bit for bit, also on errors."""

from __future__ import annotations

import pytest
import torch

from actlab.models.weights import swapped


def test_swap_computes_and_restores_the_same_object(tiny_llama):
    lin = tiny_llama.adapter.layers[0].linears["q"].module
    original = lin.weight
    before = original.detach().clone()
    ids = torch.arange(5, 25)[None]
    with torch.no_grad():
        dense = tiny_llama.model(ids).logits
        with swapped(lin, "weight", torch.zeros_like(original)):
            assert lin.weight is not original and not bool(lin.weight.any())
            changed = tiny_llama.model(ids).logits
        assert not torch.equal(changed, dense)
        with pytest.raises(RuntimeError, match="boom"), swapped(lin, "weight", original * 2):
            raise RuntimeError("boom")
        assert lin.weight is original and torch.equal(lin.weight, before)
        assert torch.equal(tiny_llama.model(ids).logits, dense)


def test_swap_refuses_wrong_shapes_and_names(tiny_llama):
    lin = tiny_llama.adapter.layers[0].linears["q"].module
    with pytest.raises(ValueError, match="shape"), swapped(lin, "weight", torch.zeros(3, 3)):
        pass
    with pytest.raises(KeyError, match="no parameter or buffer"), swapped(lin, "nope", torch.zeros(1)):
        pass
