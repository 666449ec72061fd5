"""What every kind of set metric shares: which metrics an instrument reports (`MetricSet`), the timing
columns every report writes beside them (`TIMING`), and the two reductions every world's metrics use
(`spread` within a set, `finite_mean` over what applies). The metrics themselves are per world:
`ldm.eval.metrics_v1` (the synthetic objects of the first demo world) and `ldm.eval.metrics_v2`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class MetricSet:
    """The metrics one kind of instrument writes (`descriptions`, in column order), the columns of the
    report's main table, the ones whose change from 'off' it pairs by seed, and those of its
    per-attribute table (none for v1, whose attributes are all in the main table)."""

    descriptions: Mapping[str, str]
    report_columns: tuple[str, ...]
    paired_columns: tuple[str, ...]
    detail_columns: tuple[str, ...] = ()


TIMING: dict[str, str] = {
    "sec_per_image": "seconds per image, sampling and decoding (not measuring)",
    "peak_memory_mb": "peak memory: CUDA max_memory_allocated per set; on the CPU the process's peak RSS "
                      "(ru_maxrss), a high-water mark that never decreases as configurations run in order",
}


def spread(values: Sequence[float]) -> float:
    """Population std of the values; NaN for fewer than two (no spread within one image)."""
    if len(values) < 2:
        return math.nan
    array = np.asarray(values, dtype=np.float64)
    # Deviations from one of the values leave the std unchanged and make equal values give exactly 0.
    return float(np.std(array - array[0]))


def finite_mean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values; NaN when there are none."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
