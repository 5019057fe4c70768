"""FedAvgM (Hsu et al., 2019): heavy-ball momentum on the pseudo-gradient g = global - mean."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from xffl_cwl.contract.strategies import FEDAVGM, StrategyInfo


@dataclass(frozen=True)
class FedAvgM:
    server_lr: float
    momentum: float

    info: ClassVar[StrategyInfo] = FEDAVGM

    def step(self, weights: Tensor, mean: Tensor, state: dict[str, Tensor]) -> Tensor:
        buf = state["momentum"]
        buf.mul_(self.momentum).add_(weights - mean)
        return weights - self.server_lr * buf
