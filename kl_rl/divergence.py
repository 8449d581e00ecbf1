"""Divergence: which item (a seed, a grid point's seed, a trial's seed) went non-finite, and when.

Inside the program, every update sets the `nonfinite` metric (`nonfinite`); on the host,
`first_nonfinite` reads the metrics back into the first update that went non-finite per item.
`kl_rl.run`, sweeps and tuning all read it the same way, so a diverged item is recorded with its
update everywhere and never counted or ranked as a number.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NAN_BY_DESIGN = ("episode_return", "episode_length", "cg_residual", "eval_return")
"""Metrics that are NaN in a healthy run: the episode statistics until the first episode ends,
TRPO's `cg_residual` with direction "gradient" (which solves nothing), and `eval_return` between
evaluation points."""


def nonfinite(agent_state: Any, metrics: dict[str, jax.Array]) -> jax.Array:
    """1.0 if a float leaf of the agent's state or a metric (NAN_BY_DESIGN aside) is inf or nan, else 0.0."""
    checked = (agent_state, {k: v for k, v in metrics.items() if k not in NAN_BY_DESIGN})
    floats = [x for x in jax.tree.leaves(checked) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.logical_not(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floats]))).astype(jnp.float32)


def first_nonfinite(metrics: dict[str, Any]) -> list[int | None]:
    """Per item, the first update (1-based, metrics.csv's `update`) that went non-finite, or None.

    An update counts if its `nonfinite` metric is set, or if any other float metric,
    NAN_BY_DESIGN aside, is inf or nan there, so metrics without `nonfinite` work too.

    Args:
      metrics: [items, updates] arrays by name, such as `RunResult.metrics`.
    """
    arrays = {k: np.asarray(v) for k, v in metrics.items()}
    bad = np.zeros(next(iter(arrays.values())).shape, bool)
    for name, values in arrays.items():
        if name in NAN_BY_DESIGN or not np.issubdtype(values.dtype, np.inexact):
            continue
        bad |= values != 0 if name == "nonfinite" else ~np.isfinite(values)
    return [int(np.argmax(row)) + 1 if row.any() else None for row in bad]
