"""FedYogi (Reddi et al., ICLR 2021, Algorithm 2): Adam whose second moment moves additively.

v <- v - (1 - beta2) g^2 sign(v - g^2), so v cannot shrink faster than the gradients do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from xffl_cwl.contract.strategies import FEDYOGI, StrategyInfo


@dataclass(frozen=True)
class FedYogi:
    server_lr: float
    betas: tuple[float, float]
    tau: float

    info: ClassVar[StrategyInfo] = FEDYOGI

    def step(self, weights: Tensor, mean: Tensor, state: dict[str, Tensor]) -> Tensor:
        g = weights - mean
        g2 = g * g
        m, v = state["m"], state["v"]
        m.mul_(self.betas[0]).add_(g, alpha=1 - self.betas[0])
        v.sub_((1 - self.betas[1]) * g2 * (v - g2).sign())
        return weights - self.server_lr * m / (v.sqrt() + self.tau)
