"""Server optimizers: one file each, one `step(weights, mean, state)` each.

`weights` is the chunk of the current global model, `mean` the weighted mean of the clients'
values for it, `state` the optimizer's slots for that chunk (updated in place). The
pseudo-gradient of FedOpt is `weights - mean`.
"""

from __future__ import annotations

import inspect
from typing import Protocol

from torch import Tensor

from xffl_cwl.aggregation.strategies.fedadam import FedAdam
from xffl_cwl.aggregation.strategies.fedavg import FedAvg
from xffl_cwl.aggregation.strategies.fedavgm import FedAvgM
from xffl_cwl.aggregation.strategies.fedyogi import FedYogi
from xffl_cwl.aggregation.strategies.nesterov import Nesterov
from xffl_cwl.errors import InputError


class ServerOptimizer(Protocol):
    name: str
    slots: tuple[str, ...]
    server_lr: float

    def step(self, weights: Tensor, mean: Tensor, state: dict[str, Tensor]) -> Tensor: ...


STRATEGIES: dict[str, type] = {cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, Nesterov)}


def make_strategy(name: str, server_lr: float | None = None, momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.99), tau: float = 1e-3) -> ServerOptimizer:
    """Build a strategy from CLI-level settings; each takes the ones it understands."""
    if name not in STRATEGIES:
        raise InputError(f"--strategy {name!r} is unknown; choose one of {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name]
    offered = {"server_lr": cls.default_lr if server_lr is None else server_lr, "momentum": momentum, "betas": tuple(betas), "tau": tau}
    if offered["server_lr"] <= 0:
        raise InputError(f"--server-lr must be positive, got {offered['server_lr']}")
    if not 0 <= momentum < 1:
        raise InputError(f"--momentum must be in [0, 1), got {momentum}")
    if len(offered["betas"]) != 2 or not all(0 <= b < 1 for b in offered["betas"]):
        raise InputError(f"--betas must be two numbers in [0, 1), got {betas}")
    if tau <= 0:
        raise InputError(f"--tau must be positive, got {tau}")
    accepted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in offered.items() if k in accepted})


def hyperparameters(strategy: ServerOptimizer) -> dict[str, object]:
    """The settings a strategy ran with, for aggregate.json and the state file."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(strategy).items()}


__all__ = ["STRATEGIES", "ServerOptimizer", "make_strategy", "hyperparameters", "FedAvg", "FedAvgM", "FedAdam", "FedYogi", "Nesterov"]
