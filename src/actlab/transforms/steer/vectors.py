"""Steering directions from contrastive pairs: the math, apart from the model.

Each method turns the residual-stream states of the positive and negative side of n pairs at one layer,
[n, d] each (read at the last token of each text), into one direction [d]:

- mean-diff (ActAdd, Turner et al. 2023; CAA, Rimsky et al. 2024): the mean of positive - negative. Its norm is
  the average separation, so coefficient 1 moves a state by one average difference.
- pca-diff (RepE, Zou et al. 2023; repeng's default): the first principal component of the differences (centred,
  as a PCA centres its data), unit norm.
- pca-center (repeng): the first principal component of the states after each pair's midpoint is subtracted,
  unit norm.

A principal component has no sign: it is oriented so that the positive side projects higher than the
negative side in most pairs (repeng's rule: flipped when more pairs project the other way).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from actlab.errors import ConfigError
from actlab.transforms.base import Method, make_method


def check_pairs(positive: torch.Tensor, negative: torch.Tensor) -> None:
    if positive.shape != negative.shape or positive.dim() != 2:
        raise ConfigError(f"positive and negative states must both be [pairs, width], got {tuple(positive.shape)} "
                          f"and {tuple(negative.shape)}")
    if positive.shape[0] < 1:
        raise ConfigError("a steering direction needs at least one contrastive pair")


def mean_difference(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    check_pairs(positive, negative)
    return (positive.double() - negative.double()).mean(0).float()


def first_component(x: torch.Tensor) -> torch.Tensor:
    """The first principal component of the rows of x (centred), unit norm; sign arbitrary."""
    centred = x.double() - x.double().mean(0, keepdim=True)
    if centred.shape[0] < 2 or not bool(centred.abs().max() > 0):
        raise ConfigError("a principal direction needs at least two distinct rows (two pairs that differ)")
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return vh[0].float()


def orient(direction: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """`direction`, flipped if more pairs project their negative side higher than their positive side."""
    up = positive.double() @ direction.double()
    down = negative.double() @ direction.double()
    return -direction if int((up < down).sum()) > int((up > down).sum()) else direction


def pca_of_differences(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    check_pairs(positive, negative)
    return orient(first_component(positive - negative), positive, negative)


def pca_around_midpoints(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    check_pairs(positive, negative)
    mid = (positive.double() + negative.double()) / 2
    states = torch.cat([positive.double() - mid, negative.double() - mid])
    return orient(first_component(states), positive, negative)


class SteeringMethod(Method):
    """A way to make one layer's direction from contrastive states."""

    family = "steer"
    name: ClassVar[str]
    paper: ClassVar[str]

    def direction(self, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def calibrate(self, calib, target):  # steering trains on pairs: see actlab.jobs.steer
        raise ConfigError("steering methods train on contrastive pairs (actlab steer train), not a calibration set")


class MeanDiff(SteeringMethod):
    name = "mean-diff"
    paper = "ActAdd (Turner et al. 2023) / CAA (Rimsky et al. 2024): mean activation difference"

    def direction(self, positive, negative):
        return mean_difference(positive, negative)


class PCADiff(SteeringMethod):
    name = "pca-diff"
    paper = "RepE (Zou et al. 2023), repeng pca_diff: first principal component of the differences"

    def direction(self, positive, negative):
        return pca_of_differences(positive, negative)


class PCACenter(SteeringMethod):
    name = "pca-center"
    paper = "repeng pca_center: first principal component around each pair's midpoint"

    def direction(self, positive, negative):
        return pca_around_midpoints(positive, negative)


METHODS: dict[str, type[SteeringMethod]] = {m.name: m for m in (MeanDiff, PCADiff, PCACenter)}


def get_method(name: str, **params) -> SteeringMethod:
    return make_method(METHODS, "steering", name, **params)
