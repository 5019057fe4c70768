"""Server optimizers: one file each, one `step(weights, mean, state)` each.

`weights` is the chunk of the current global model, `mean` the weighted mean of the clients'
values for it, `state` the optimizer's slots for that chunk (updated in place). The
pseudo-gradient of FedOpt is `weights - mean`. Names, defaults and slots are in the catalogue,
xffl_cwl.contract.strategies; each class here points at its entry.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict
from typing import ClassVar, Protocol

from numpy import ndarray

from xffl_cwl.contract.options import AggregateOptions
from xffl_cwl.contract.strategies import STRATEGIES, StrategyInfo
from xffl_cwl.errors import InputError
from xffl_cwl.learning.aggregation.strategies.fedadam import FedAdam
from xffl_cwl.learning.aggregation.strategies.fedavg import FedAvg
from xffl_cwl.learning.aggregation.strategies.fedavgm import FedAvgM
from xffl_cwl.learning.aggregation.strategies.fedyogi import FedYogi
from xffl_cwl.learning.aggregation.strategies.nesterov import Nesterov


class ServerOptimizer(Protocol):
    info: ClassVar[StrategyInfo]
    server_lr: float

    def step(self, weights: ndarray, mean: ndarray, state: dict[str, ndarray]) -> ndarray: ...


IMPLEMENTATIONS: dict[str, type] = {cls.info.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, Nesterov)}


def make_strategy(options: AggregateOptions) -> ServerOptimizer:
    """Build the configured strategy; each takes the settings it uses (options are already checked)."""
    info = STRATEGIES.get(options.strategy)
    if info is None:
        raise InputError(f"--strategy {options.strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}")
    cls = IMPLEMENTATIONS[info.name]
    offered = {
        "server_lr": info.default_lr if options.server_lr is None else options.server_lr,
        "momentum": options.momentum,
        "betas": tuple(options.betas),
        "tau": options.tau,
    }
    accepted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in offered.items() if k in accepted})


def hyperparameters(strategy: ServerOptimizer) -> dict[str, object]:
    """The settings a strategy ran with, for aggregate.json and the state file."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(strategy).items()}


__all__ = ["IMPLEMENTATIONS", "ServerOptimizer", "hyperparameters", "make_strategy"]
