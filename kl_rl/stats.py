"""Aggregates of final returns over seeds: the IQM and its bootstrap interval (NumPy only).

`kl_rl.analysis` builds its estimators over tasks and runs on the same weights; the run, sweep
and tune summaries use `iqm` and `bootstrap_iqm_ci` directly.
"""

from numpy.typing import ArrayLike

import numpy as np


def iqm_weights(n: int) -> np.ndarray:
    """[n] weights of n sorted scores: 1 inside [n/4, 3n/4], the inside fraction at the cut points.

    A score straddling a cut point counts with the fraction of it inside, so the IQM is defined
    for any n (Agarwal et al. 2021 trim whole scores only when 4 divides n).
    """
    lo, hi = n * 0.25, n * 0.75
    rank = np.arange(n)
    return np.clip(np.minimum(rank + 1, hi) - np.maximum(rank, lo), 0.0, 1.0)


def iqm(x: ArrayLike) -> np.ndarray | float:
    """Interquartile mean over the last axis: the mean of the middle 50% of values (Agarwal et al. 2021).

    [..., n] -> [...]; a float for 1-D input.
    """
    x = np.sort(np.asarray(x, dtype=np.float64), axis=-1)
    weights = iqm_weights(x.shape[-1])
    out = np.sum(weights * x, axis=-1) / np.sum(weights)
    return float(out) if out.ndim == 0 else out


def bootstrap_iqm_ci(x: ArrayLike, reps: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the IQM, resampling seeds with replacement."""
    x = np.asarray(x, np.float64)
    rng = np.random.default_rng(seed)
    samples = [iqm(x[rng.integers(0, len(x), len(x))]) for _ in range(reps)]
    lo, hi = np.quantile(samples, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
