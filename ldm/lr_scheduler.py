"""Learning-rate schedules referenced by the configs (`scheduler_config`), as multipliers of the base rate."""
from __future__ import annotations

from typing import Sequence

import numpy as np


class LambdaLinearScheduler:
    """Linear warm-up from f_start to f_max over warm_up_steps, then linear from f_max towards f_min over
    the rest of each cycle. `schedule(step)` gives the multiplier (used with torch's LambdaLR)."""

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[int], verbosity_interval: int = 0):
        lengths = {len(warm_up_steps), len(f_min), len(f_max), len(f_start), len(cycle_lengths)}
        if len(lengths) != 1:
            raise ValueError("warm_up_steps, f_min, f_max, f_start and cycle_lengths must have the same length")
        self.warm_up_steps = list(warm_up_steps)
        self.f_min, self.f_max, self.f_start = list(f_min), list(f_max), list(f_start)
        self.cycle_lengths = list(cycle_lengths)
        self.cum_cycles = np.cumsum([0] + self.cycle_lengths)

    def schedule(self, n: int) -> float:
        cycle = int(np.searchsorted(self.cum_cycles[1:], n, side="right"))
        cycle = min(cycle, len(self.cycle_lengths) - 1)
        n = n - self.cum_cycles[cycle]
        if n < self.warm_up_steps[cycle]:
            return float(self.f_start[cycle] + (self.f_max[cycle] - self.f_start[cycle]) * n / self.warm_up_steps[cycle])
        progress = (self.cycle_lengths[cycle] - n) / self.cycle_lengths[cycle]
        return float(self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * progress)

    def __call__(self, n: int) -> float:
        return self.schedule(n)
