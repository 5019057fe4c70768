"""Nesterov outer optimizer (DiLoCo, Douillard et al., 2023): m <- mu m + g; step by g + mu m."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from xffl_cwl.contract.strategies import NESTEROV, StrategyInfo


@dataclass(frozen=True)
class Nesterov:
    server_lr: float
    momentum: float

    info: ClassVar[StrategyInfo] = NESTEROV

    def step(self, weights: Tensor, mean: Tensor, state: dict[str, Tensor]) -> Tensor:
        g = weights - mean
        buf = state["momentum"]
        buf.mul_(self.momentum).add_(g)
        return weights - self.server_lr * (g + self.momentum * buf)
