"""Nesterov outer optimizer (DiLoCo, Douillard et al., 2023): m <- mu m + g; step by g + mu m."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor


@dataclass(frozen=True)
class Nesterov:
    server_lr: float = 0.7
    momentum: float = 0.9

    name: ClassVar[str] = "nesterov"
    slots: ClassVar[tuple[str, ...]] = ("momentum",)
    default_lr: ClassVar[float] = 0.7

    def step(self, weights: Tensor, mean: Tensor, state: dict[str, Tensor]) -> Tensor:
        g = weights - mean
        buf = state["momentum"]
        buf.mul_(self.momentum).add_(g)
        return weights - self.server_lr * (g + self.momentum * buf)
