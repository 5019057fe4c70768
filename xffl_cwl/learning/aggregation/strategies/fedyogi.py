"""FedYogi (Reddi et al., ICLR 2021, Algorithm 2): Adam whose second moment moves additively.

v <- v - (1 - beta2) g^2 sign(v - g^2), so v cannot shrink faster than the gradients do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from xffl_cwl.contract.strategies import FEDYOGI, StrategyInfo


@dataclass(frozen=True)
class FedYogi:
    server_lr: float
    betas: tuple[float, float]
    tau: float

    info: ClassVar[StrategyInfo] = FEDYOGI

    def step(self, weights: np.ndarray, mean: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        g = weights - mean
        g2 = g * g
        m, v = state["m"], state["v"]
        m *= self.betas[0]
        m += (1 - self.betas[0]) * g
        v -= (1 - self.betas[1]) * g2 * np.sign(v - g2)
        return weights - self.server_lr * m / (np.sqrt(v) + self.tau)
