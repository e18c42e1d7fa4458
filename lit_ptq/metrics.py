"""Metrics whose distributed reduction is exact, so 1 and N processes report identical numbers."""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["ExactMean", "PercentAccuracy"]


class ExactMean(Metric):
    """Mean of per-sample values accumulated in int64 fixed point (2**-32 resolution).

    Floating-point sums depend on the order of addition, so a mean reduced across ranks
    differs in its last bits from a one-process run; integer sums do not. Each value is
    rounded to a multiple of 2**-32 (far below float32 precision for losses) before summing.

    Attributes:
        total: fixed-point sum of the values.
        count: number of values.
    """

    full_state_update = False
    _ONE = float(2**32)

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        """Add a 1-D tensor of per-sample values."""
        fixed = torch.round(values.detach().double() * self._ONE).to(torch.int64)
        self.total += fixed.sum()
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        """The mean, as float64 (NaN when nothing was added)."""
        if int(self.count) == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.total.double() / self._ONE / self.count.double()


class PercentAccuracy(MulticlassAccuracy):
    """torchmetrics' :class:`~torchmetrics.classification.MulticlassAccuracy`, in percent.

    The value is the float32 fraction torchmetrics computes, times 100 in float64 and rounded
    to 4 decimals (``round(100.0 * fraction, 4)``, the results JSON's ``acc1`` / ``acc5``), so
    Lightning's table, TensorBoard and the JSON show one number in one unit, and the JSON's
    value is exactly the one it had when the fraction was logged.
    """

    def compute(self) -> torch.Tensor:
        """The accuracy in percent, a float64 scalar on the metric's device."""
        fraction = super().compute()
        return torch.tensor(round(100.0 * float(fraction), 4), dtype=torch.float64, device=fraction.device)
