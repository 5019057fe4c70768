"""FedAvgM (Hsu et al., 2019): heavy-ball momentum on the pseudo-gradient g = global - mean."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from xffl_cwl.contract.strategies import FEDAVGM, StrategyInfo


@dataclass(frozen=True)
class FedAvgM:
    server_lr: float
    momentum: float

    info: ClassVar[StrategyInfo] = FEDAVGM

    def step(self, weights: np.ndarray, mean: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        buf = state["momentum"]
        buf *= self.momentum
        buf += weights - mean
        return weights - self.server_lr * buf
