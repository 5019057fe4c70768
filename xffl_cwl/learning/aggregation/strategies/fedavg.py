"""FedAvg (McMahan et al., 2017): the next global model is the sample-weighted mean of the clients'."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from xffl_cwl.contract.strategies import FEDAVG, StrategyInfo


@dataclass(frozen=True)
class FedAvg:
    server_lr: float

    info: ClassVar[StrategyInfo] = FEDAVG

    def step(self, weights: np.ndarray, mean: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        if self.server_lr == 1.0:
            return mean  # exactly the weighted mean, no rounding through the pseudo-gradient
        return weights - self.server_lr * (weights - mean)
