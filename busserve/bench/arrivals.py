"""Arrival processes for open-loop load: Poisson, or gamma-distributed gaps for burstier traffic.

Gaps are gamma(shape=k, scale=1/(rate·k)): mean 1/rate for every k; k = 1 is Poisson (exponential gaps), k < 1 is
burstier (coefficient of variation 1/√k), k > 1 smoother. ``rate = inf`` sends everything at once.
"""

from __future__ import annotations

import math
import random


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds from the start at which each of ``n`` requests is sent."""
    if n <= 0:
        return []
    if rate <= 0:
        raise ValueError("rate must be positive (inf: all at once)")
    if burstiness <= 0:
        raise ValueError("burstiness (gamma shape) must be positive")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out
