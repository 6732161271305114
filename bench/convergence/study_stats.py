"""Interval estimates and paired tests of the convergence study's report (issue #21).

* :func:`wilson_interval`: the Wilson score interval of a binomial proportion.
* :func:`mcnemar_exact_p`: McNemar's exact test on paired correct/incorrect outcomes
  (two-sided binomial test of the discordant pairs against 1/2).
* :func:`paired_bootstrap_diff`: percentile bootstrap interval of the difference of
  token-weighted mean losses of two runs on the same samples, resampling samples.
"""

from __future__ import annotations

import math
import random
from typing import List, Sequence, Tuple


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> Tuple[float, float]:
    """The Wilson score interval (default 95%) of ``correct / n``; ``(0, 1)`` when ``n == 0``."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= correct <= n:
        raise ValueError(f"correct must lie in [0, n={n}], got {correct}")
    p = correct / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _binom_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exactly (integers), then as a float."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def mcnemar_exact_p(first: Sequence[bool], second: Sequence[bool]) -> Tuple[float, int, int]:
    """Two-sided exact McNemar p-value for paired outcomes; also ``b`` (only ``first``
    correct) and ``c`` (only ``second`` correct). ``p = min(1, 2·P(X <= min(b, c)))``,
    ``X ~ Bin(b + c, 1/2)``; 1.0 without discordant pairs."""
    if len(first) != len(second):
        raise ValueError(f"paired outcomes differ in length: {len(first)} vs {len(second)}")
    b = sum(1 for x, y in zip(first, second) if x and not y)
    c = sum(1 for x, y in zip(first, second) if y and not x)
    if b + c == 0:
        return 1.0, b, c
    return min(1.0, 2.0 * _binom_cdf(min(b, c), b + c)), b, c


def weighted_mean(pairs: Sequence[Sequence[float]]) -> float:
    """``Σ sum / Σ count`` of ``[[loss sum, token count], ...]``."""
    return sum(p[0] for p in pairs) / sum(p[1] for p in pairs)


def paired_bootstrap_diff(first: Sequence[Sequence[float]], second: Sequence[Sequence[float]], *,
                          resamples: int = 10000, seed: int = 0, level: float = 0.95) -> Tuple[float, float, float]:
    """``(difference, low, high)`` of ``weighted_mean(first) − weighted_mean(second)``:
    the observed difference and the percentile interval over ``resamples`` resamples of the
    sample indices (the same indices for both runs: the pairing)."""
    if len(first) != len(second) or not first:
        raise ValueError(f"paired losses need the same non-zero number of samples: {len(first)} vs {len(second)}")
    for (_, ca), (_, cb) in zip(first, second):
        if ca != cb:
            raise ValueError("paired losses disagree on a sample's token count: not the same samples")
    n = len(first)
    rng = random.Random(seed)
    observed = weighted_mean(first) - weighted_mean(second)
    diffs: List[float] = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        count = sum(first[i][1] for i in picks)
        diffs.append((sum(first[i][0] for i in picks) - sum(second[i][0] for i in picks)) / count)
    diffs.sort()
    tail = (1.0 - level) / 2
    low = diffs[int(math.floor(tail * (resamples - 1)))]
    high = diffs[int(math.ceil((1.0 - tail) * (resamples - 1)))]
    return observed, low, high
