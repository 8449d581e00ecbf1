"""Proximal Policy Optimization (Schulman et al. 2017, arXiv:1707.06347).

Clipped surrogate, optionally clipped value loss, entropy bonus, per-minibatch advantage
normalization, global gradient-norm clipping and minibatch epochs, as in the paper and the
implementation details catalogued by Huang et al. (2022). Two KL mechanisms, both measuring
KL(old || new) exactly from the behaviour distribution recorded in the buffer:

- an adaptive KL penalty beta * KL(old || new) in the loss (paper, section 4), with beta set by
  a `kl_rl.kl` controller; with a very large `clip_eps` this is the paper's pure KL-penalty PPO;
- target-KL early stopping: once a minibatch's KL(old || new), estimated with k3 from the
  log-probs the loss already has, exceeds 1.5 x target_kl, the rest of that update's gradient
  steps are skipped (Stable-Baselines3's rule; Spinning Up's uses k1).

The `kl` metric of every update is exact: the mean KL(old || new) over the whole batch, between
the behaviour distributions stored in the buffer and the updated policy.

On stale data (`policy_lag` > 0 or `replay_rollouts` > 1) with `is_correction`, the update is
decoupled PPO (Hilton et al. 2021, "Batch size-invariance for policy optimization"): the clip,
the KL penalty, target-KL and `kl` are taken around the proximal policy -- the current policy at
the start of the update -- while the behaviour policy enters only through truncated importance
weights min(rho_clip, pi_prox / pi_behaviour), on the objective and in V-trace advantages and
value targets. `kl_behaviour` is the exact mean KL(behaviour || new) and `ess` the effective
sample size of the weights pi_prox / pi_behaviour.

`surrogate="spo"` replaces the clipped surrogate by Simple Policy Optimization's (Xie et al.,
ICML 2025, arXiv:2401.16025): r A - |A| / (2 eps) (r - 1)^2, a penalty on the ratio's deviation
whose gradient, unlike the clip's, pulls a ratio outside [1 - eps, 1 + eps] back toward 1.

The update itself is `kl_rl.agents.common.proximal_agent`, which MDPO shares; PPO is its policy
term.
"""

import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp

from kl_rl.agents.base import Agent
from kl_rl.agents.common import PPOState, ProximalConfig, normalize_advantages, proximal_agent, value_loss
from kl_rl.config import static
from kl_rl.errors import ConfigError

SURROGATES = ("clip", "spo")

__all__ = [
    "SURROGATES",
    "PPOConfig",
    "PPOState",
    "clipped_surrogate_loss",
    "normalize_advantages",
    "ppo",
    "spo_surrogate_loss",
    "value_loss",
]  # fmt: skip


@flax.struct.dataclass
class PPOConfig(ProximalConfig):
    """PPO hyperparameters. Defaults are PureJaxRL's `ppo.py` CartPole settings."""

    surrogate: str = static("clip")
    """The policy objective: clip (PPO's clipped surrogate) or spo (Simple Policy Optimization's
    r A - |A| / (2 clip_eps) (r - 1)^2, Xie et al. 2025)."""

    def validate(self, action_space: gym.Space) -> None:
        """Raises ConfigError on values no run could use."""
        self._check_proximal(action_space)
        if self.surrogate not in SURROGATES:
            raise ConfigError(
                f"unknown {{surrogate}} {self.surrogate!r}; use one of {', '.join(SURROGATES)}", "surrogate"
            )


def clipped_surrogate_loss(
    log_ratio: jax.Array, advantages: jax.Array, clip_eps: jax.Array, weight: jax.Array | None = None
) -> jax.Array:
    """-E[min(r A, clip(r, 1 - eps, 1 + eps) A)] with r = exp(log_ratio) (PPO paper, eq. 7).

    With `weight` w (decoupled PPO, Hilton et al. 2021): -E[w min(r A, clip(r) A)], where r is
    the ratio to the proximal policy and w the truncated ratio pi_prox / pi_behaviour.
    """
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    objective = jnp.minimum(ratio * advantages, clipped * advantages)
    return -jnp.mean(objective if weight is None else weight * objective)


def spo_surrogate_loss(
    log_ratio: jax.Array, advantages: jax.Array, clip_eps: jax.Array, weight: jax.Array | None = None
) -> jax.Array:
    """-E[r A - |A| / (2 eps) (r - 1)^2] with r = exp(log_ratio) (SPO, Xie et al. 2025).

    Per sample the objective is a concave parabola in r with its top at r = 1 + sign(A) eps, the
    edge of PPO's clip range that the advantage favours: beyond it the gradient pulls r back,
    where the clip's is zero. With `weight` w: -E[w (...)], as in `clipped_surrogate_loss`.
    """
    ratio = jnp.exp(log_ratio)
    objective = ratio * advantages - jnp.abs(advantages) / (2.0 * clip_eps) * jnp.square(ratio - 1.0)
    return -jnp.mean(objective if weight is None else weight * objective)


def ppo(config: PPOConfig, observation_space: gym.Space, action_space: gym.Space) -> Agent:
    """Builds PPO's pure functions for one env's spaces.

    Args:
      config: hyperparameters; numeric fields may be traced.
      observation_space: single-env observation space.
      action_space: single-env action space.
    """
    surrogate = spo_surrogate_loss if config.surrogate == "spo" else clipped_surrogate_loss

    def policy_loss(log_ratio, advantages, weight, dist, anchor, progress):
        del dist, anchor, progress
        pg_loss = surrogate(log_ratio, advantages, config.clip_eps, weight)
        clip_frac = jnp.mean((jnp.abs(jnp.exp(log_ratio) - 1.0) > config.clip_eps).astype(jnp.float32))
        return pg_loss, {"clip_frac": clip_frac}

    return proximal_agent(config, observation_space, action_space, policy_loss)
