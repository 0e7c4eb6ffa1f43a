"""``WeightedMean``: the validation losses' mean over batches, each weighted by what it averages over."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class WeightedMean(Metric):
    """The mean of values, each weighted (by what its batch's mean averages over), over every process when
    computed. torchmetrics' ``MeanMetric`` drops the weights under ``nan_strategy="disable"``, and its other
    strategies drop NaN values or raise on them, at a wait for the device per update; a NaN loss here makes
    the mean NaN, as it should."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: Tensor, weight: float | Tensor) -> None:
        self.total += value.detach().float() * weight
        self.weight += weight

    def compute(self) -> Tensor:
        return self.total / self.weight
