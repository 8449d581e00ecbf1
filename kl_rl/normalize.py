"""Running mean / variance normalization whose state is a pytree of the train state.

Chan et al.'s parallel update merges a batch's moments into the running ones, so the state
checkpoints and vmaps like any other part of the train state.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class RunningMeanStd(NamedTuple):
    """Running moments over a leading batch axis."""

    mean: jax.Array
    var: jax.Array
    count: jax.Array


def init(shape: tuple[int, ...]) -> RunningMeanStd:
    """Zero mean, unit variance and a tiny count, so the first batch dominates."""
    return RunningMeanStd(
        mean=jnp.zeros(shape, jnp.float32),
        var=jnp.ones(shape, jnp.float32),
        count=jnp.asarray(1e-4, jnp.float32),
    )


def update(state: RunningMeanStd, x: jax.Array) -> RunningMeanStd:
    """Merges a batch `x` of shape [B, *shape] into the running moments."""
    batch_mean = jnp.mean(x, axis=0)
    batch_var = jnp.var(x, axis=0)
    batch_count = jnp.asarray(x.shape[0], jnp.float32)
    delta = batch_mean - state.mean
    total = state.count + batch_count
    mean = state.mean + delta * batch_count / total
    m2 = state.var * state.count + batch_var * batch_count + delta**2 * state.count * batch_count / total
    return RunningMeanStd(mean=mean, var=m2 / total, count=total)


def normalize(state: RunningMeanStd, x: jax.Array, clip: float = 10.0, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std, clipped to [-clip, clip]."""
    return jnp.clip((x - state.mean) / jnp.sqrt(state.var + eps), -clip, clip)
