"""The server optimizers the aggregator offers: names, defaults, state and the settings each uses.

This is the catalogue; the arithmetic lives in xffl_cwl/learning/aggregation/strategies/, one file
per entry, each pointing back at its entry here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    default_lr: float
    slots: tuple[str, ...]  # server-state tensors carried from round to round
    uses: tuple[str, ...]  # aggregation settings besides server_lr that it reads
    summary: str


FEDAVG = StrategyInfo("fedavg", 1.0, (), (), "x - lr*g (lr 1: the weighted mean)")
FEDAVGM = StrategyInfo("fedavgm", 1.0, ("momentum",), ("momentum",), "m = mu*m + g; x - lr*m")
FEDADAM = StrategyInfo(
    "fedadam", 0.01, ("m", "v"), ("betas", "tau"), "m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; x - lr*m/(sqrt(v)+tau)"
)
FEDYOGI = StrategyInfo("fedyogi", 0.01, ("m", "v"), ("betas", "tau"), "as fedadam with v = v - (1-b2)*g^2*sign(v-g^2)")
NESTEROV = StrategyInfo(
    "nesterov", 0.7, ("momentum",), ("momentum",), "m = mu*m + g; x - lr*(g + mu*m) (DiLoCo's outer step)"
)

STRATEGIES: dict[str, StrategyInfo] = {s.name: s for s in (FEDAVG, FEDAVGM, FEDADAM, FEDYOGI, NESTEROV)}
STRATEGY_NAMES: tuple[str, ...] = tuple(STRATEGIES)


def users_of(setting: str) -> str:
    """`fedavgm and nesterov`: the strategies that read a setting, for help texts."""
    names = [s.name for s in STRATEGIES.values() if setting in s.uses]
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def default_lrs() -> str:
    """`fedavg/fedavgm 1.0, fedadam/fedyogi 0.01, nesterov 0.7`: the default server learning rates."""
    groups: dict[float, list[str]] = {}
    for s in STRATEGIES.values():
        groups.setdefault(s.default_lr, []).append(s.name)
    return ", ".join(f"{'/'.join(names)} {lr}" for lr, names in groups.items())
