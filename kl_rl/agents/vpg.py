"""Vanilla policy gradient: REINFORCE with a learned baseline and GAE (Spinning Up's VPG).

Each update takes `policy_iters` full-batch Adam steps on

    L(theta) = -E[log pi_theta(a|s) A] - ent_coef H[pi_theta] + beta KL(pi_old || pi_theta),

with A the GAE advantages of the batch (normalized over the batch by default), then fits the
critic separately with `vf_epochs` passes of minibatch regression on the lambda-returns. With one
policy step (Spinning Up's choice) the KL term has zero gradient, since KL(pi_old || pi_theta)
is minimal at theta = theta_old; it shapes the update from the second step on. Its coefficient
beta can be fixed or set by an adaptive or proportional controller from `kl_rl.kl`, fed the
exact mean KL(old || new) of each update.

On stale data (`policy_lag` > 0 or `replay_rollouts` > 1) with `is_correction`, the gradient is
the off-policy policy gradient with truncated weights, -E[min(rho_clip, pi_prox / mu)
(pi_theta / pi_prox) A] with mu the behaviour policy and pi_prox the policy before the update,
on V-trace advantages; the KL penalty is taken around pi_prox.
"""

from typing import ClassVar

import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp

from kl_rl import kl
from kl_rl.agents.base import Agent, UpdateContext
from kl_rl.agents.common import (
    PenalizedConfig, add_reference_loss, actor_critic, adam, estimates, apply_step, check_divides, explained_variance,
    fit_value, kl_controller, normalize_advantages, value_regression_data
)
from kl_rl.config import static


@flax.struct.dataclass
class VPGConfig(PenalizedConfig):
    """VPG hyperparameters. Defaults follow Spinning Up's VPG (4000 steps per update)."""

    num_envs: int = static(8)
    """Parallel environments collected in lockstep."""
    num_steps: int = static(500)
    """Steps per env per rollout; a batch is num_envs x num_steps transitions."""
    policy_iters: int = static(1)
    """Full-batch Adam steps on the policy per update (Spinning Up: 1)."""
    vf_epochs: int = static(80)
    """Passes of critic regression per update (Spinning Up: 80 full-batch steps)."""
    vf_minibatches: int = static(1)
    """Minibatches per critic pass; must divide num_envs x num_steps."""
    lr: float = 3e-4
    """Policy Adam learning rate."""
    vf_lr: float = 1e-3
    """Critic Adam learning rate."""
    gae_lambda: float = 0.97
    """GAE lambda."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient."""

    recurrent_update: ClassVar[bool] = True

    def validate(self, action_space: gym.Space) -> None:
        """Raises ConfigError on values no run could use."""
        self._check_on_policy(action_space, ("policy_iters", "vf_epochs", "vf_minibatches"), ("lr", "vf_lr"))
        check_divides("vf_minibatches", self.vf_minibatches, self.batch_size)


@flax.struct.dataclass
class VPGState:
    """Policy and critic parameters, their Adam states and the KL penalty's controller state."""

    params: dict
    opt_state: dict
    kl_ctrl: kl.KLControllerState


def vpg(config: VPGConfig, observation_space: gym.Space, action_space: gym.Space) -> Agent:
    """Builds VPG's pure functions for one env's spaces."""
    ac = actor_critic(config, observation_space, action_space)
    optimizer = adam()
    controller = kl_controller(config)
    use_penalty = config.kl_penalty != "none"

    def init(key: jax.Array) -> VPGState:
        params = ac.init_params(key)
        opt_state = {name: optimizer.init(p) for name, p in params.items()}
        return VPGState(params=params, opt_state=opt_state, kl_ctrl=controller.init())

    stale = config.stale
    decoupled = stale and config.is_correction

    def policy_loss(params, traj, advantages, beta, ref_beta, prox):
        dist = ac.distribution(params, traj)
        log_prob = dist.log_prob(traj.action)
        if decoupled:
            prox_log_prob, anchor_dist = prox
            weight = jnp.minimum(config.rho_clip, jnp.exp(prox_log_prob - traj.log_prob))
            pg_loss = -jnp.mean(weight * jnp.exp(log_prob - prox_log_prob) * advantages)
        else:
            anchor_dist = traj.dist
            pg_loss = -jnp.mean(log_prob * advantages)
        entropy = jnp.mean(dist.entropy())
        loss = pg_loss - config.ent_coef * entropy
        if use_penalty:
            loss = loss + kl.kl_penalty_loss(beta, kl.kl_old_new(anchor_dist, dist))
        if stale:
            loss = loss + kl.kl_penalty_loss(config.behaviour_kl_coef, kl.kl_old_new(traj.dist, dist))
        loss = add_reference_loss(loss, config, dist, traj, ref_beta)
        return loss, pg_loss

    def update(key: jax.Array, state: VPGState, traj, ctx: UpdateContext):
        ref_beta = ctx.ref_beta
        params = state.params
        est = estimates(ac.policy_net, params["policy"], lambda o, *s: ac.value(state, o, *s), traj, config)
        traj, advantages, returns, prox_dist, log_rho, prox = est
        if config.normalize_advantages:
            advantages = normalize_advantages(advantages)
        beta = state.kl_ctrl.beta

        def policy_step(carry, _):
            p, s = carry
            (_, pg_loss), grads = jax.value_and_grad(policy_loss, has_aux=True)(
                p, traj, advantages, beta, ref_beta, prox
            )
            updates, s = optimizer.update(grads, s, p)
            return (apply_step(p, updates, config.lr), s), pg_loss

        (policy_params, policy_opt), pg_losses = jax.lax.scan(
            policy_step, (params["policy"], state.opt_state["policy"]), None, length=config.policy_iters
        )
        value_params, value_opt, vf_loss = fit_value(
            key, ac.value_net, params["value"], state.opt_state["value"], optimizer, config.vf_lr,
            *value_regression_data(config, ac.critic_input(traj.obs, traj.policy_state), returns),
            config.vf_epochs, config.vf_minibatches,
        )  # fmt: skip
        new_dist = ac.distribution(policy_params, traj)
        kl_behaviour = jnp.mean(kl.kl_old_new(traj.dist, new_dist))
        kl_batch = jnp.mean(kl.kl_old_new(prox_dist, new_dist)) if decoupled else kl_behaviour
        new_state = VPGState(
            params={"policy": policy_params, "value": value_params},
            opt_state={"policy": policy_opt, "value": value_opt},
            kl_ctrl=controller.update(state.kl_ctrl, kl_batch, config.batch_size),
        )
        metrics = {
            "pg_loss": pg_losses[0],
            "vf_loss": vf_loss,
            "kl": kl_batch,
            "entropy": jnp.mean(new_dist.entropy()),
            "explained_variance": explained_variance(returns, traj.value),
            "beta": beta,
            "kl_behaviour": kl_behaviour,
            # On fresh data the policy before the update is the behaviour policy: weights are 1.
            "ess": kl.effective_sample_size(log_rho) if stale else jnp.ones((), jnp.float32),
        }
        return new_state, metrics

    return Agent(init=init, act=ac.act, value=ac.value, policy=ac.policy, update=update,
                 initial_state=ac.initial_state)  # fmt: skip

