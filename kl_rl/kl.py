"""Distributions, exact KL, sample estimators of KL, KL penalties and KL controllers.

Everything is computed in log space and stays finite, in value and gradient, for masked actions
(-inf logits), probabilities near 0 and 1, and log-stds from -20 to 5.

Direction, once and for all: `kl_divergence(p, q)` is KL(p || q) = E_{x~p}[log p(x) - log q(x)].
In policy optimization "old" is the behaviour policy that collected the data and "new" the one
being optimized. TRPO's constraint and PPO's adaptive penalty use KL(old || new)
(`kl_old_new`); KL(new || old) (`kl_new_old`) is the mode-seeking direction, e.g. the RLHF
penalty KL(pi || pi_ref).

Distributions are NamedTuples, so they are pytrees: the replay buffer stores them, and vmap and
scan carry them like arrays.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

_HALF_LOG_2PI = 0.5 * float(jnp.log(2.0 * jnp.pi))
# exp(log r) overflows float32 past ~88; the estimators clip log r to this range (|log r| > 30
# means a probability ratio beyond 1e13, far outside any trust region).
_LOG_RATIO_CLIP = 30.0


class Categorical(NamedTuple):
    """A categorical distribution over the last axis of `logits`; masked actions carry -inf."""

    logits: jax.Array

    @property
    def log_probs(self) -> jax.Array:
        return jax.nn.log_softmax(self.logits, axis=-1)

    @property
    def probs(self) -> jax.Array:
        return jax.nn.softmax(self.logits, axis=-1)

    def log_prob(self, action: jax.Array) -> jax.Array:
        """log p(action) for integer actions, broadcasting actions against the logits' batch shape."""
        log_probs = self.log_probs
        batch = jnp.broadcast_shapes(jnp.shape(action), log_probs.shape[:-1])
        log_probs = jnp.broadcast_to(log_probs, batch + log_probs.shape[-1:])
        action = jnp.broadcast_to(jnp.asarray(action, jnp.int32), batch)
        return jnp.take_along_axis(log_probs, action[..., None], axis=-1)[..., 0]

    def entropy(self) -> jax.Array:
        """-sum_a p(a) log p(a), with 0 log 0 = 0 for masked actions."""
        log_p = self.log_probs
        valid = log_p > -jnp.inf
        safe = jnp.where(valid, log_p, 0.0)
        return -jnp.sum(jnp.where(valid, jnp.exp(safe) * safe, 0.0), axis=-1)

    def sample(self, key: jax.Array) -> jax.Array:
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
        return self.mean + jnp.exp(self.log_std) * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


Distribution = Categorical | DiagGaussian


def kl_divergence(p: Distribution, q: Distribution) -> jax.Array:
    """Exact KL(p || q) = E_{x~p}[log p(x) - log q(x)], summed over the event axis.

    Categorical: sum_a p(a) (log p(a) - log q(a)), with terms where p(a) = 0 taken as 0 (so two
    distributions masked alike have finite KL and gradients). DiagGaussian: the closed form
    sum_d [log s_q - log s_p + (s_p^2 + (m_p - m_q)^2) / (2 s_q^2) - 1/2].
    """
    if isinstance(p, Categorical) and isinstance(q, Categorical):
        log_p, log_q = p.log_probs, q.log_probs
        valid = log_p > -jnp.inf
        safe_p = jnp.where(valid, log_p, 0.0)
        safe_q = jnp.where(valid, log_q, 0.0)
        return jnp.sum(jnp.where(valid, jnp.exp(safe_p) * (safe_p - safe_q), 0.0), axis=-1)
    if isinstance(p, DiagGaussian) and isinstance(q, DiagGaussian):
        log_ratio_std = p.log_std - q.log_std
        z = (p.mean - q.mean) * jnp.exp(-q.log_std)
        terms = -log_ratio_std + 0.5 * (jnp.exp(2.0 * log_ratio_std) + jnp.square(z)) - 0.5
        return jnp.sum(jnp.broadcast_to(terms, jnp.broadcast_shapes(p.mean.shape, q.mean.shape)), axis=-1)
    raise TypeError(f"no closed-form KL between {type(p).__name__} and {type(q).__name__}")


def kl_old_new(old: Distribution, new: Distribution) -> jax.Array:
    """KL(old || new): TRPO's trust-region constraint (Schulman et al. 2015) and PPO's penalty (2017)."""
    return kl_divergence(old, new)


def kl_new_old(old: Distribution, new: Distribution) -> jax.Array:
    """KL(new || old): the reverse, mode-seeking direction (e.g. MPO's and RLHF's penalties)."""
    return kl_divergence(new, old)


def _log_ratio(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    return jnp.clip(log_p - log_q, -_LOG_RATIO_CLIP, _LOG_RATIO_CLIP)


def kl_k1(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """k1 = -log r, r = p(x)/q(x), x ~ q: unbiased for KL(q || p), high variance, can be < 0.

    Schulman (2020), "Approximating KL Divergence". Arguments are log p(x) and log q(x) of the
    samples; log r is clipped to +/-30 for finiteness.
    """
    return -_log_ratio(log_p, log_q)


def kl_k2(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """k2 = (log r)^2 / 2, x ~ q: a biased, low-variance estimate of KL(q || p), always >= 0.

    Its bias is third order in the log-ratio, so it is close for p near q (Schulman 2020).
    """
    return 0.5 * jnp.square(_log_ratio(log_p, log_q))


def kl_k3(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """k3 = (r - 1) - log r, x ~ q: unbiased for KL(q || p), low variance, always >= 0.

    Schulman (2020). r - 1 is computed as expm1(log r) for precision near r = 1. With samples
    from the behaviour policy q = old and p = new this estimates KL(old || new).
    """
    log_r = _log_ratio(log_p, log_q)
    return jnp.expm1(log_r) - log_r


def kl_reverse_k3(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """r log r - (r - 1), x ~ q: unbiased for the reverse direction KL(p || q), always >= 0.

    Schulman (2020): the k3 construction applied to E_q[r log r] = KL(p || q). With samples from
    the behaviour policy q = old and p = new this estimates KL(new || old).
    """
    log_r = _log_ratio(log_p, log_q)
    return jnp.exp(log_r) * log_r - jnp.expm1(log_r)


class KLControllerState(NamedTuple):
    """A KL controller's state: the current penalty coefficient."""

    beta: jax.Array


class KLController(NamedTuple):
    """An (init, update) pair: init() -> state; update(state, kl, n_steps=1) -> state."""

    init: Callable[[], KLControllerState]
    update: Callable[..., KLControllerState]


def fixed_kl_controller(beta: Any) -> KLController:
    """A constant beta."""
    return KLController(
        init=lambda: KLControllerState(jnp.asarray(beta, jnp.float32)),
        update=lambda state, kl, n_steps=1: state,
    )


def adaptive_kl_controller(init_beta: Any, target_kl: Any) -> KLController:
    """PPO's adaptive coefficient (Schulman et al. 2017, sec. 4).

    After each update with observed d = KL(old || new): if d < target / 1.5, beta /= 2; if
    d > target * 1.5, beta *= 2. `init_beta` and `target_kl` may be traced.
    """

    def update(state: KLControllerState, kl: jax.Array, n_steps: Any = 1) -> KLControllerState:
        del n_steps
        beta = jnp.where(kl > 1.5 * target_kl, state.beta * 2.0, state.beta)
        beta = jnp.where(kl < target_kl / 1.5, state.beta / 2.0, beta)
        return KLControllerState(beta)

    return KLController(init=lambda: KLControllerState(jnp.asarray(init_beta, jnp.float32)), update=update)


def proportional_kl_controller(init_beta: Any, target_kl: Any, horizon: Any, k_beta: Any = 0.1) -> KLController:
    """Ziegler et al. (2019)'s proportional controller.

    e = clip(kl / target - 1, -0.2, 0.2); beta <- beta (1 + k_beta * e * n_steps / horizon), where
    n_steps is the number of samples behind `kl`.
    """

    def update(state: KLControllerState, kl: jax.Array, n_steps: Any = 1) -> KLControllerState:
        error = jnp.clip(kl / target_kl - 1.0, -0.2, 0.2)
        return KLControllerState(state.beta * (1.0 + k_beta * error * n_steps / horizon))

    return KLController(init=lambda: KLControllerState(jnp.asarray(init_beta, jnp.float32)), update=update)


def kl_penalty_loss(beta: jax.Array, kl: jax.Array) -> jax.Array:
    """The loss term beta * mean(kl), e.g. kl = KL(old || new) per state for PPO's penalty."""
    return beta * jnp.mean(kl)


def kl_penalized_reward(
    reward: jax.Array, log_prob_policy: jax.Array, log_prob_ref: jax.Array, beta: jax.Array
) -> jax.Array:
    """r - beta (log pi(a|s) - log pi_ref(a|s)), the per-step penalty of Ziegler et al. (2019).

    With a ~ pi, the subtracted term is beta times the k1 sample of KL(pi || pi_ref), so the
    penalized return's expectation subtracts beta times the sum of per-state KL(pi || pi_ref).
    """
    return reward - beta * (log_prob_policy - log_prob_ref)
