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
"""

import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp
import optax

from kl_rl import kl
from kl_rl.agents.base import Agent, UpdateContext
from kl_rl.agents.common import (
    PenalizedConfig, add_reference_loss, actor_critic, adam, estimates, apply_step, check_divides, explained_variance,
    kl_controller, minibatch_epochs, normalize_advantages, value_loss
)
from kl_rl.config import static


@flax.struct.dataclass
class PPOConfig(PenalizedConfig):
    """PPO hyperparameters. Defaults are PureJaxRL's `ppo.py` CartPole settings."""

    update_epochs: int = static(4)
    """Passes over each batch."""
    num_minibatches: int = static(4)
    """Minibatches per epoch; must divide num_envs x num_steps."""
    clip_value: bool = static(False)
    """Clip the value update to +/- clip_eps around the behaviour value (PPO2 / PureJaxRL)."""
    anneal_lr: bool = static(True)
    """Decay the learning rate linearly to zero over training."""
    lr: float = 2.5e-4
    """Adam learning rate (initial value when annealed)."""
    clip_eps: float = 0.2
    """Clip range of the probability ratio (and of the value update when clip_value)."""
    ent_coef: float = 0.01
    """Entropy bonus coefficient."""
    vf_coef: float = 0.5
    """Value loss coefficient."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip."""
    target_kl: float = 0.0
    """Early-stop an update once a minibatch's k3 estimate of KL(old || new) exceeds 1.5 x target_kl; 0 disables."""

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    def validate(self, action_space: gym.Space) -> None:
        """Raises ConfigError on values no run could use."""
        self._check_on_policy(action_space, ("update_epochs", "num_minibatches"), ("lr", "clip_eps", "max_grad_norm"))
        check_divides("num_minibatches", self.num_minibatches, self.batch_size)


@flax.struct.dataclass
class PPOState:
    """Everything an update changes; checkpointing this restores the agent exactly."""

    params: dict
    opt_state: optax.OptState
    kl_ctrl: kl.KLControllerState


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


def ppo(config: PPOConfig, observation_space: gym.Space, action_space: gym.Space) -> Agent:
    """Builds PPO's pure functions for one env's spaces.

    Args:
      config: hyperparameters; numeric fields may be traced.
      observation_space: single-env observation space.
      action_space: single-env action space.
    """
    ac = actor_critic(config, observation_space, action_space)
    policy_net, value_net = ac.policy_net, ac.value_net
    optimizer = adam(config.max_grad_norm)
    controller = kl_controller(config)
    use_penalty = config.kl_penalty != "none"

    def init(key: jax.Array) -> PPOState:
        params = ac.init_params(key)
        return PPOState(params=params, opt_state=optimizer.init(params), kl_ctrl=controller.init())

    stale = config.stale
    decoupled = stale and config.is_correction

    def loss_fn(params, batch, beta, ref_beta):
        traj, advantages, returns, prox = batch
        dist = policy_net.apply(params["policy"], traj.obs)
        log_prob = dist.log_prob(traj.action)
        # The policy the clip and the previous-iterate KL are taken around: the behaviour
        # policy, or on corrected stale data the proximal one (the policy before this update).
        if decoupled:
            anchor_log_prob, anchor_dist = prox
            weight = jnp.minimum(config.rho_clip, jnp.exp(anchor_log_prob - traj.log_prob))
        else:
            anchor_log_prob, anchor_dist, weight = traj.log_prob, traj.dist, None
        log_ratio = log_prob - anchor_log_prob
        if config.normalize_advantages:
            advantages = normalize_advantages(advantages)
        pg_loss = clipped_surrogate_loss(log_ratio, advantages, config.clip_eps, weight)
        value = value_net.apply(params["value"], traj.obs)
        vf_loss = value_loss(value, traj.value, returns, config.clip_eps, config.clip_value)
        entropy = jnp.mean(dist.entropy())
        approx_kl = jnp.mean(kl.kl_k3(log_prob, anchor_log_prob))
        loss = pg_loss + config.vf_coef * vf_loss - config.ent_coef * entropy
        if use_penalty:
            loss = loss + kl.kl_penalty_loss(beta, kl.kl_old_new(anchor_dist, dist))
        if stale:
            loss = loss + kl.kl_penalty_loss(config.behaviour_kl_coef, kl.kl_old_new(traj.dist, dist))
        loss = add_reference_loss(loss, config, dist, traj, ref_beta)
        aux = {
            "pg_loss": pg_loss,
            "vf_loss": vf_loss,
            "entropy_loss": -entropy,
            "approx_kl_k3": approx_kl,
            "clip_frac": jnp.mean((jnp.abs(jnp.exp(log_ratio) - 1.0) > config.clip_eps).astype(jnp.float32)),
        }
        return loss, aux

    def update(key: jax.Array, state: PPOState, traj, ctx: UpdateContext):
        ref_beta = ctx.ref_beta
        params = state.params
        est = estimates(policy_net, params["policy"], lambda obs: ac.value(state, obs), traj, config)
        traj, advantages, returns, prox_dist, log_rho, prox = est
        lr = config.lr * (1.0 - ctx.progress) if config.anneal_lr else config.lr
        beta = state.kl_ctrl.beta

        def minibatch_step(carry, minibatch):
            params, opt_state, stopped = carry
            (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, minibatch, beta, ref_beta)
            stopped = stopped | (config.target_kl > 0) & (aux["approx_kl_k3"] > 1.5 * config.target_kl)
            updates, new_opt_state = optimizer.update(grads, opt_state, params)

            def keep(new, old):
                return jax.tree.map(lambda n, o: jnp.where(stopped, o, n), new, old)

            carry = (keep(apply_step(params, updates, lr), params), keep(new_opt_state, opt_state), stopped)
            return carry, {**aux, "grad_steps": 1.0 - stopped.astype(jnp.float32)}

        carry = (params, state.opt_state, jnp.asarray(False))
        (params, opt_state, stopped), aux = minibatch_epochs(
            key, minibatch_step, carry, (traj, advantages, returns, prox), config.update_epochs, config.num_minibatches
        )

        new_dist = policy_net.apply(params["policy"], traj.obs)
        kl_behaviour = jnp.mean(kl.kl_old_new(traj.dist, new_dist))
        kl_batch = jnp.mean(kl.kl_old_new(prox_dist, new_dist)) if decoupled else kl_behaviour
        kl_ctrl = controller.update(state.kl_ctrl, kl_batch, config.batch_size)
        metrics = {k: jnp.mean(v) for k, v in aux.items() if k != "grad_steps"}
        metrics.update(
            kl=kl_batch,
            entropy=jnp.mean(new_dist.entropy()),
            grad_steps=jnp.sum(aux["grad_steps"]),
            early_stopped=stopped.astype(jnp.float32),
            explained_variance=explained_variance(returns, traj.value),
            beta=state.kl_ctrl.beta,
            lr=jnp.asarray(lr, jnp.float32),
            kl_behaviour=kl_behaviour,
            # On fresh data the proximal policy is the behaviour policy: every weight is 1.
            ess=kl.effective_sample_size(log_rho) if stale else jnp.ones((), jnp.float32),
        )
        return PPOState(params=params, opt_state=opt_state, kl_ctrl=kl_ctrl), metrics

    return Agent(init=init, act=ac.act, value=ac.value, policy=ac.policy, update=update)
