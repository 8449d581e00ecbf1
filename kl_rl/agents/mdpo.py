"""On-policy Mirror Descent Policy Optimization (Tomar et al., ICLR 2022, arXiv:2005.09814).

Each update approximately solves the mirror-descent step around the previous iterate pi_k (the
policy at the start of the update, which collected the batch) with several epochs of minibatch
SGD on

    E_{s, a ~ pi_k}[ pi_theta(a|s) / pi_k(a|s) A^{pi_k}(s, a) ] - (1 / t_k) E_s[ KL(pi_theta || pi_k)(s) ]

with no ratio clipping. The KL is the mode-seeking direction KL(new || old) = KL(pi_theta || pi_k)
(`kl_rl.kl.kl_new_old`), the reverse of PPO's penalty and TRPO's constraint, KL(pi_k || pi_theta).
It is exact per state, between the distribution recorded in the buffer and the current one.

The step size t_k is annealed as in the paper's on-policy experiments: t_k = t_0 (1 - k / K) over
the K updates of training, so the penalty coefficient 1 / t_k grows from 1 / t_0 (to K / t_0 at
the last update) and the iterates settle. `anneal_step_size=False` keeps t_k = t_0.

Checked against the authors' code (github.com/manantomar/Mirror-Descent-Policy-Optimization,
`mdpo_on/mdpo.py`, method "multistep-SGD"): the same objective, mean(r A) - mean KL / t_k, with
the KL taken as `pi_theta.kl(pi_old)` = KL(pi_theta || pi_k) in closed form, and the same linear
schedule of t_k. Where this implementation differs, by design:

- their t_k is 1 - (i - 1) / K at iteration i = 0, 1, ..., so it starts at 1 + 1/K; here it is
  t_0 (1 - k / K), one iteration's 1/K lower throughout (the last update: t_0 / K against 2 / K);
- their m = `sgd_steps` (5 or 10) are full-batch Adam steps (lr 3e-4, grad norm 0.5) on the policy
  alone, with the critic fit apart (`vf_iters` epochs of 128-minibatches) and no entropy bonus;
  here the policy and critic share PPO's loss and its `update_epochs` x `num_minibatches` steps,
  advantages normalized per minibatch (per batch, as theirs, with num_minibatches = 1, as in the
  CartPole preset).

Everything around the policy term -- critic, entropy bonus, Adam, minibatch epochs, target-KL
early stopping, stale data -- is `kl_rl.agents.common.proximal_agent`, the update PPO uses.
Metrics beside PPO's: `mdpo_kl`, the KL(pi_theta || pi_k) term averaged over the update's
gradient steps, `mdpo_coef` = 1 / t_k, and `surrogate`, the importance-weighted advantage term
(negated, as a loss); `pg_loss` is their sum surrogate + mdpo_coef * mdpo_kl.
"""

from typing import Any

import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp

from kl_rl import kl
from kl_rl.agents.base import Agent
from kl_rl.agents.common import ProximalConfig, proximal_agent
from kl_rl.config import static


@flax.struct.dataclass
class MDPOConfig(ProximalConfig):
    """MDPO hyperparameters: PPO's update fields (`ProximalConfig`) and the mirror-descent step size.

    clip_eps clips only the value update (with clip_value); the policy objective has no clip.
    """

    step_size: float = 1.0
    """t_0: the mirror-descent step size of the first update; the KL penalty's coefficient is 1 / t_k."""
    anneal_step_size: bool = static(True)
    """Anneal t_k = t_0 (1 - k / K) over training (the paper's on-policy schedule); off keeps t_0."""

    def validate(self, action_space: gym.Space) -> None:
        """Raises ConfigError on values no run could use."""
        self._check_proximal(action_space, ("step_size",))


def mdpo_loss(
    log_ratio: jax.Array, advantages: jax.Array, dist: Any, anchor: Any, coef: jax.Array,
    weight: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """-E[r A] + coef E[KL(pi || pi_k)], r = exp(log_ratio) = pi(a) / pi_k(a) (Tomar et al. 2022).

    Args:
      log_ratio: log pi(a) - log pi_k(a), [B].
      advantages: A^{pi_k}, [B].
      dist: pi, the policy being optimized, batch shape [B].
      anchor: pi_k, the previous iterate, batch shape [B].
      coef: 1 / t_k.
      weight: truncated importance weights pi_k / pi_behaviour on corrected stale data, [B].

    Returns:
      (loss, the surrogate term -E[w r A], the mean KL(pi || pi_k)).
    """
    objective = jnp.exp(log_ratio) * advantages
    surrogate = -jnp.mean(objective if weight is None else weight * objective)
    kl_term = jnp.mean(kl.kl_new_old(anchor, dist))
    return surrogate + kl.kl_penalty_loss(coef, kl_term), surrogate, kl_term


def mdpo_coef(step_size: jax.Array, progress: jax.Array, anneal: bool) -> jax.Array:
    """1 / t_k with t_k = t_0 (1 - progress) when annealed (progress = k / K < 1), else 1 / t_0."""
    t_k = step_size * (1.0 - progress) if anneal else step_size
    return jnp.asarray(1.0 / t_k, jnp.float32)


def mdpo(config: MDPOConfig, observation_space: gym.Space, action_space: gym.Space) -> Agent:
    """Builds on-policy MDPO's pure functions for one env's spaces.

    Args:
      config: hyperparameters; numeric fields may be traced.
      observation_space: single-env observation space.
      action_space: single-env action space.
    """

    def policy_loss(log_ratio, advantages, weight, dist, anchor, progress):
        coef = mdpo_coef(config.step_size, progress, config.anneal_step_size)
        loss, surrogate, kl_term = mdpo_loss(log_ratio, advantages, dist, anchor, coef, weight)
        return loss, {"surrogate": surrogate, "mdpo_kl": kl_term, "mdpo_coef": coef}

    return proximal_agent(config, observation_space, action_space, policy_loss)
