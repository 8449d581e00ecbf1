"""Trust Region Policy Optimization (Schulman et al. 2015, arXiv:1502.05477).

Each update maximizes the surrogate L(theta) = E[pi_theta(a|s) / pi_old(a|s) A] subject to
mean KL(pi_old || pi_theta) <= delta over the batch (with a frozen reference policy and its
penalty in the loss, L(theta) - beta * KL to the reference):

1. g = grad L at theta_old.
2. Direction x: with `direction="natural"`, conjugate gradient solves (F + damping I) x = g,
   where F v is a Fisher-vector product -- the Hessian-vector product of the mean
   KL(pi_old || pi_theta) at theta_old, computed forward-over-reverse, with no dense matrix. With
   `direction="gradient"` (the simplest form of the same idea) x = g, with no conjugate gradient.
3. Maximum step from delta: the step beta x with beta = sqrt(2 delta / x^T (F + damping I) x),
   the largest whose quadratic KL model equals delta.
4. Backtracking line search over theta_old + c^j beta x, j = 0 .. backtrack_iters - 1: the first
   candidate whose exact mean KL(pi_old || pi_theta) on the batch is <= delta and whose surrogate
   improves on theta_old's is taken. If none is, the policy stays unchanged (`accepted` is 0 and
   `kl` is 0 in the metrics).

The critic is fitted separately afterwards (minibatch Adam regression on the lambda-returns). The
behaviour distribution pi_old comes from the buffer, so the KL is measured against the policy
that collected the data.

A recurrent policy (`network` gru or lstm) is a function of the whole history, so pi_theta at a
step is the policy unrolled along its env's sequence from the state recorded at the rollout's
first step, reset where an episode starts (`kl_rl.networks.unroll`, the same unroll as PPO's
update): the surrogate, the Fisher-vector products (the Hessian of the sequence KL, with
gradients through every step of the unroll) and the line search's KL checks all see that policy.
"""

from collections.abc import Callable
from typing import Any, ClassVar

import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from kl_rl import kl
from kl_rl.agents.base import Agent, UpdateContext
from kl_rl.agents.common import (
    OnPolicyConfig, add_reference_loss, actor_critic, adam, advantages_and_returns, check_divides, explained_variance,
    fit_value, normalize_advantages, value_regression_data
)
from kl_rl.config import static
from kl_rl.errors import ConfigError

DIRECTIONS = ("natural", "gradient")


@flax.struct.dataclass
class TRPOConfig(OnPolicyConfig):
    """TRPO hyperparameters. Defaults follow sb3-contrib's TRPO and Spinning Up."""

    num_envs: int = static(4)
    """Parallel environments collected in lockstep."""
    num_steps: int = static(512)
    """Steps per env per rollout; a batch is num_envs x num_steps transitions."""
    direction: str = static("natural")
    """Step direction: natural (conjugate gradient on Fisher-vector products) or gradient (the plain
    policy gradient; same maximum step and KL-checked line search, no conjugate gradient)."""
    cg_iters: int = static(10)
    """Conjugate-gradient iterations (fewer if the residual vanishes first)."""
    backtrack_iters: int = static(10)
    """Line-search candidates tried before the update is rejected."""
    vf_epochs: int = static(10)
    """Passes of critic regression per update."""
    vf_minibatches: int = static(16)
    """Minibatches per critic pass; must divide num_envs x num_steps."""
    max_kl: float = 0.01
    """delta: the largest mean KL(old || new) an accepted step may have."""
    cg_damping: float = 0.1
    """Damping added to the Fisher matrix: CG solves (F + damping I) x = g."""
    backtrack_coeff: float = 0.8
    """Each line-search candidate shrinks the step by this factor."""
    vf_lr: float = 1e-3
    """Critic Adam learning rate."""

    recurrent_update: ClassVar[bool] = True

    def validate(self, action_space: gym.Space) -> None:
        """Raises ConfigError on values no run could use."""
        self._check_on_policy(
            action_space, ("cg_iters", "backtrack_iters", "vf_epochs", "vf_minibatches"), ("max_kl", "vf_lr")
        )
        check_divides("vf_minibatches", self.vf_minibatches, self.batch_size)
        if self.direction not in DIRECTIONS:
            raise ConfigError(
                f"unknown {{direction}} {self.direction!r}; use one of {', '.join(DIRECTIONS)}", "direction"
            )
        if not 0.0 < float(self.backtrack_coeff) < 1.0:
            raise ConfigError(
                f"{{backtrack_coeff}} must lie in (0, 1), got {float(self.backtrack_coeff)}", "backtrack_coeff"
            )
        if not float(self.cg_damping) >= 0.0:
            raise ConfigError(f"{{cg_damping}} must be >= 0, got {float(self.cg_damping)}", "cg_damping")


@flax.struct.dataclass
class TRPOState:
    """Policy and critic parameters and the critic's Adam state (the policy step has no optimizer)."""

    params: dict
    opt_state: dict


def fisher_vector_product(
    kl_fn: Callable[[jax.Array], jax.Array], theta: jax.Array, damping: jax.Array
) -> Callable[[jax.Array], jax.Array]:
    """v -> (H + damping I) v, with H the Hessian of `kl_fn` at `theta`.

    For kl_fn(theta) = mean KL(pi_old || pi_theta) and theta = theta_old, H is the Fisher
    information matrix of the policy. The product is forward-over-reverse (a JVP of the
    gradient), so F is never formed.
    """
    grad = jax.grad(kl_fn)

    def fvp(v: jax.Array) -> jax.Array:
        return jax.jvp(grad, (theta,), (v,))[1] + damping * v

    return fvp


def conjugate_gradient(
    matvec: Callable[[jax.Array], jax.Array], b: jax.Array, iters: int, tol: float = 1e-10
) -> jax.Array:
    """Approximately solves A x = b for symmetric positive-definite A, starting from x = 0.

    Runs at most `iters` iterations, stopping once the squared residual norm is below `tol`.
    """

    def cond(carry):
        i, _, _, _, rr = carry
        return (i < iters) & (rr > tol)

    def body(carry):
        i, x, r, p, rr = carry
        ap = matvec(p)
        alpha = rr / jnp.vdot(p, ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = jnp.vdot(r, r)
        p = r + (rr_new / rr) * p
        return i + 1, x, r, p, rr_new

    init = (jnp.zeros((), jnp.int32), jnp.zeros_like(b), b, b, jnp.vdot(b, b))
    return jax.lax.while_loop(cond, body, init)[1]


def surrogate_and_kl(distribution: Callable[[Any, Any], Any], unravel: Callable[[jax.Array], Any], traj,
                     advantages: jax.Array, config: TRPOConfig,
                     ref_beta: Any) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:  # fmt: skip
    """theta -> (surrogate L(theta), mean KL(pi_old || pi_theta)) over an update's batch.

    `distribution(policy_params, traj)` is the policy's distribution at every step of the batch
    (`kl_rl.agents.common.ActorCritic.distribution`: of each observation, or a recurrent policy
    unrolled along the env-major sequences); pi_old is the behaviour distribution the buffer
    recorded. The surrogate is mean(pi_theta(a) / pi_old(a) * A), less the reference penalty when
    it goes in the loss. One policy pass gives both.
    """

    def fn(theta):
        dist = distribution(unravel(theta), traj)
        surr = jnp.mean(jnp.exp(dist.log_prob(traj.action) - traj.log_prob) * advantages)
        # A reference penalty in the loss is subtracted from the surrogate it maximizes.
        surr = -add_reference_loss(-surr, config, dist, traj, ref_beta)
        return surr, jnp.mean(kl.kl_old_new(traj.dist, dist))

    return fn


def trpo(config: TRPOConfig, observation_space: gym.Space, action_space: gym.Space) -> Agent:
    """Builds TRPO's pure functions for one env's spaces."""
    ac = actor_critic(config, observation_space, action_space)
    value_optimizer = adam()

    def init(key: jax.Array) -> TRPOState:
        params = ac.init_params(key)
        return TRPOState(params=params, opt_state={"value": value_optimizer.init(params["value"])})

    def update(key: jax.Array, state: TRPOState, traj, ctx: UpdateContext):
        ref_beta = ctx.ref_beta
        traj, advantages, returns = advantages_and_returns(lambda o, *s: ac.value(state, o, *s), traj, config)
        if config.normalize_advantages:
            advantages = normalize_advantages(advantages)
        theta_old, unravel = ravel_pytree(state.params["policy"])

        objectives = surrogate_and_kl(ac.distribution, unravel, traj, advantages, config, ref_beta)

        def surrogate(theta):
            return objectives(theta)[0]

        def mean_kl(theta):
            return objectives(theta)[1]

        surr_old, g = jax.value_and_grad(surrogate)(theta_old)
        fvp = fisher_vector_product(mean_kl, theta_old, config.cg_damping)
        if config.direction == "natural":
            x = conjugate_gradient(fvp, g, config.cg_iters)
            fx = fvp(x)
            cg_residual = jnp.linalg.norm(fx - g) / (jnp.linalg.norm(g) + 1e-12)
        else:
            x = g
            fx = fvp(x)
            cg_residual = jnp.full((), jnp.nan, jnp.float32)
        step_size = jnp.sqrt(2.0 * config.max_kl / (jnp.vdot(x, fx) + 1e-12))
        full_step = step_size * x

        def search_cond(carry):
            j, accepted, *_ = carry
            return (j < config.backtrack_iters) & ~accepted

        def search_body(carry):
            j, _, theta, _, _ = carry
            candidate = theta_old + config.backtrack_coeff**j * full_step
            surr, kl_value = objectives(candidate)  # one policy pass per candidate
            ok = (kl_value <= config.max_kl) & (surr > surr_old) & jnp.isfinite(surr) & jnp.isfinite(kl_value)
            return (
                j + 1,
                ok,
                jnp.where(ok, candidate, theta),
                jnp.where(ok, surr, surr_old),
                jnp.where(ok, kl_value, 0.0),
            )

        zero = jnp.zeros((), jnp.float32)
        carry = (jnp.zeros((), jnp.int32), jnp.asarray(False), theta_old, surr_old, zero)
        ls_steps, accepted, theta_new, surr_new, kl_accepted = jax.lax.while_loop(search_cond, search_body, carry)

        value_params, value_opt, vf_loss = fit_value(
            key, ac.value_net, state.params["value"], state.opt_state["value"], value_optimizer, config.vf_lr,
            *value_regression_data(config, ac.critic_input(traj.obs, traj.policy_state), returns),
            config.vf_epochs, config.vf_minibatches,
        )  # fmt: skip
        new_state = TRPOState(
            params={"policy": unravel(theta_new), "value": value_params}, opt_state={"value": value_opt}
        )
        metrics = {
            "kl": kl_accepted,
            "line_search_steps": ls_steps.astype(jnp.float32),
            "accepted": accepted.astype(jnp.float32),
            "cg_residual": cg_residual,
            "step_size": step_size,
            "surrogate_improvement": surr_new - surr_old,
            "expected_improvement": jnp.vdot(g, full_step),
            "vf_loss": vf_loss,
            "entropy": jnp.mean(ac.distribution(unravel(theta_new), traj).entropy()),
            "explained_variance": explained_variance(returns, traj.value),
        }
        return new_state, metrics

    return Agent(init=init, act=ac.act, value=ac.value, policy=ac.policy, update=update,
                 initial_state=ac.initial_state)  # fmt: skip
