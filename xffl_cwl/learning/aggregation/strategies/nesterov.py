"""Nesterov outer optimizer (DiLoCo, Douillard et al., 2023): m <- mu m + g; step by g + mu m."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from xffl_cwl.contract.strategies import NESTEROV, StrategyInfo


@dataclass(frozen=True)
class Nesterov:
    server_lr: float
    momentum: float

    info: ClassVar[StrategyInfo] = NESTEROV

    def step(self, weights: np.ndarray, mean: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        g = weights - mean
        buf = state["momentum"]
        buf *= self.momentum
        buf += g
        return weights - self.server_lr * (g + self.momentum * buf)
