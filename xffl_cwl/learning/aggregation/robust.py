"""How a round combines its members' values, element by element.

`mean` is the weighted mean (FedAvg and the FedOpt strategies build on it). For a federation that
does not trust every member, `median` and `trimmed_mean` are coordinate-wise and unweighted: one
member with absurd values cannot move the result beyond the honest members' range (a median needs
a majority of honest members, a trimmed mean more honest members than it trims from each side).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rule:
    kind: str  # mean | trimmed_mean | median
    trim: float = 0.2

    def trimmed(self, n: int) -> int:
        """How many values a trimmed mean drops from each end: at least one when it can keep one."""
        return min(max(1, int(self.trim * n)), (n - 1) // 2) if n >= 3 else 0

    def robust(self, values: list[np.ndarray]) -> np.ndarray:
        """The coordinate-wise median or trimmed mean of equally shaped float32 chunks."""
        ordered = np.sort(np.stack(values), axis=0)
        n = len(values)
        if self.kind == "median":
            mid = n // 2
            return ordered[mid].copy() if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2
        k = self.trimmed(n)
        return ordered[k : n - k].mean(axis=0, dtype=np.float32)
