"""FedAdam (Reddi et al., ICLR 2021, Algorithm 2): Adam on the pseudo-gradient, moments start at zero.

Like the paper, no bias correction; tau bounds the adaptivity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from xffl_cwl.contract.strategies import FEDADAM, StrategyInfo


@dataclass(frozen=True)
class FedAdam:
    server_lr: float
    betas: tuple[float, float]
    tau: float

    info: ClassVar[StrategyInfo] = FEDADAM

    def step(self, weights: Tensor, mean: Tensor, state: dict[str, Tensor]) -> Tensor:
        g = weights - mean
        m, v = state["m"], state["v"]
        m.mul_(self.betas[0]).add_(g, alpha=1 - self.betas[0])
        v.mul_(self.betas[1]).addcmul_(g, g, value=1 - self.betas[1])
        return weights - self.server_lr * m / (v.sqrt() + self.tau)
