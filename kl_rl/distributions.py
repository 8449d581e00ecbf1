"""Action distributions: log-probabilities, entropy, sampling and the mode.

`Categorical` (discrete actions, with masked actions at logit -inf) and `DiagGaussian` (Box
actions). Everything is computed in log space and stays finite, in value and gradient, for masked
actions, probabilities near 0 and 1, and log-stds from -20 to 5. Exact KL between two of them is
`kl_rl.kl.kl_divergence`.

Distributions are NamedTuples, so they are pytrees: the replay buffer stores them, and vmap and
scan carry them like arrays.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class Categorical(NamedTuple):
    """A categorical distribution over the last axis of `logits`; masked actions carry -inf."""

    logits: jax.Array

    @property
    def log_probs(self) -> jax.Array:
        """Normalized log-probabilities [..., A]; -inf for masked actions."""
        return jax.nn.log_softmax(self.logits, axis=-1)

    @property
    def probs(self) -> jax.Array:
        return jax.nn.softmax(self.logits, axis=-1)

    def log_prob(self, action: ArrayLike) -> jax.Array:
        """log p(action) for integer actions, broadcast against the logits' batch shape [...]."""
        log_probs = self.log_probs
        batch = jnp.broadcast_shapes(jnp.shape(action), log_probs.shape[:-1])
        log_probs = jnp.broadcast_to(log_probs, batch + log_probs.shape[-1:])
        action = jnp.broadcast_to(jnp.asarray(action, jnp.int32), batch)
        return jnp.take_along_axis(log_probs, action[..., None], axis=-1)[..., 0]

    def entropy(self) -> jax.Array:
        """-sum_a p(a) log p(a), with 0 log 0 = 0 for masked actions."""
        log_p = self.log_probs
        valid = log_p > -jnp.inf
        # Double where: the inner one keeps -inf out of the product, so its gradient is 0, not nan.
        safe = jnp.where(valid, log_p, 0.0)
        return -jnp.sum(jnp.where(valid, jnp.exp(safe) * safe, 0.0), axis=-1)

    def sample(self, key: jax.Array) -> jax.Array:
        """One integer action per batch element, shape [...]; masked actions are never drawn."""
        return jax.random.categorical(key, self.logits, axis=-1)

    def mode(self) -> jax.Array:
        return jnp.argmax(self.logits, axis=-1)


def categorical(logits: jax.Array, mask: jax.Array | None = None) -> Categorical:
    """A Categorical whose actions where `mask` is False get logit -inf (never sampled).

    Args:
      logits: [..., A].
      mask: optional bool [..., A] of allowed actions; each row needs at least one True.
    """
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    return Categorical(logits=logits)


class DiagGaussian(NamedTuple):
    """A Gaussian with diagonal covariance over the last axis; log_std broadcasts to mean."""

    mean: jax.Array
    log_std: jax.Array

    def log_prob(self, action: jax.Array) -> jax.Array:
        """log density of `action` [..., D], summed over D."""
        z = (action - self.mean) * jnp.exp(-self.log_std)
        return jnp.sum(-0.5 * jnp.square(z) - self.log_std - _HALF_LOG_2PI, axis=-1)

    def entropy(self) -> jax.Array:
        """Differential entropy, summed over D: sum(log_std + 0.5 log(2 pi e))."""
        log_std = jnp.broadcast_to(self.log_std, self.mean.shape)
        return jnp.sum(log_std + 0.5 + _HALF_LOG_2PI, axis=-1)

    def sample(self, key: jax.Array) -> jax.Array:
        """One action [..., D] by reparameterization, mean + std * eps (differentiable)."""
        eps = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + jnp.exp(self.log_std) * eps

    def mode(self) -> jax.Array:
        return self.mean


Distribution = Categorical | DiagGaussian
"""Any of kl_rl's action distributions."""
