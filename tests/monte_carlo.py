"""Monte Carlo helpers of the distribution and KL tests."""

import math

import jax
import jax.numpy as jnp
import numpy as np


def draw(dist, key, n):
    """n samples from `dist` (unbatched) by broadcasting it to a batch of n and sampling once."""
    batched = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), dist)
    return batched.sample(key)


def mean_se(x):
    """The mean of the samples `x` and its standard error."""
    x = np.asarray(x, np.float64)
    return x.mean(), x.std() / math.sqrt(len(x))
