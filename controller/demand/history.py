"""A demand history built from the balancers' signals, for policies without Prometheus.

`SignalsHistory` keeps the largest demand seen in each forecast step (as `max_over_time` would), for
`forecast.historySeconds`; steps without a reading are NaN (missing), never zero.

What this module does not do: read anything (the registry feeds it each reconcile's signals).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from controller import decide


@dataclass
class SignalsHistory:
    """Demand history built from the signals the controller reads (for policies without Prometheus).

    Keeps the largest demand seen in each step, like `max_over_time` would, for `history_s`.
    """

    step_s: float
    history_s: float
    timestamps_: list[float] = field(default_factory=list)
    values_: list[float] = field(default_factory=list)
    fetched_s_: float | None = None

    def add(self, now: float, streams: float) -> None:
        slot = math.floor(now / self.step_s) * self.step_s
        if self.timestamps_ and self.timestamps_[-1] == slot:
            self.values_[-1] = max(self.values_[-1], streams)
        else:
            if self.timestamps_ and slot < self.timestamps_[-1]:
                return  # a clock step back: drop the sample rather than break the order
            keep = math.ceil(self.history_s / self.step_s)
            gap = round((slot - self.timestamps_[-1]) / self.step_s) if self.timestamps_ else 0
            if gap > keep:
                self.timestamps_.clear()
                self.values_.clear()
            elif gap > 1:  # steps without a reading are missing, not zero
                last = self.timestamps_[-1]
                self.timestamps_.extend(last + self.step_s * k for k in range(1, gap))
                self.values_.extend([math.nan] * (gap - 1))
            self.timestamps_.append(slot)
            self.values_.append(streams)
        self.fetched_s_ = now
        excess = len(self.timestamps_) - math.ceil(self.history_s / self.step_s)
        if excess > 0:
            del self.timestamps_[:excess]
            del self.values_[:excess]

    def history(self) -> decide.DemandHistory | None:
        if not self.timestamps_:
            return None
        return decide.DemandHistory(
            step_s=self.step_s,
            timestamps=np.asarray(self.timestamps_, dtype=np.float64),
            values=np.asarray(self.values_, dtype=np.float64),
            fetched_s=self.fetched_s_,
        )
