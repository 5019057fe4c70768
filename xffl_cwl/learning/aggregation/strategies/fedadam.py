"""FedAdam (Reddi et al., ICLR 2021, Algorithm 2): Adam on the pseudo-gradient, moments start at zero.

Like the paper, no bias correction; tau bounds the adaptivity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from xffl_cwl.contract.strategies import FEDADAM, StrategyInfo


@dataclass(frozen=True)
class FedAdam:
    server_lr: float
    betas: tuple[float, float]
    tau: float

    info: ClassVar[StrategyInfo] = FEDADAM

    def step(self, weights: np.ndarray, mean: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        g = weights - mean
        m, v = state["m"], state["v"]
        m *= self.betas[0]
        m += (1 - self.betas[0]) * g
        v *= self.betas[1]
        v += (1 - self.betas[1]) * (g * g)
        return weights - self.server_lr * m / (np.sqrt(v) + self.tau)
