"""V-MPO, on-policy maximum a posteriori policy optimization (Song et al., ICLR 2020, arXiv:1909.12238).

Each minibatch step of an update minimizes L_pi + L_eta + L_alpha + vf_coef L_V:

- Advantages A come from the critic: GAE with the config's lambda (`kl_rl.agents.common.estimates`,
  truncation bootstrapped), where the paper uses n-step targets; gae_lambda = 1 with the rollout's
  length gives the paper's n-step advantage. They are normalized over the batch by default
  (`normalize_advantages`); the E-step is invariant to their shift and the temperature absorbs
  their scale, so normalization only fixes eta's scale across training.
- E-step: the samples whose advantage is in the top `top_k_fraction` (the paper's half) of the
  minibatch get weights psi = softmax(A / eta) over the selected samples, held constant. The
  temperature eta minimizes its dual, L_eta = eta eps_eta + eta log(mean_selected exp(A / eta)),
  whose minimum puts KL(psi || uniform over the selected) at eps_eta: a tighter bound (smaller
  eps_eta) raises the temperature and flattens psi.
- M-step: weighted maximum likelihood L_pi = -sum psi log pi_theta(a|s), under the bound
  E_s[KL(pi_old || pi_theta)] <= eps_alpha, with pi_old the behaviour policy recorded in the
  buffer (the paper's target network) and the KL in the mass-covering direction of the paper,
  `kl_rl.kl.kl_old_new`. The bound is a Lagrange multiplier alpha with the stop-gradient form
  L_alpha = alpha (eps_alpha - sg[KL]) + sg[alpha] KL (`kl_rl.kl.kl_constraint_loss`): alpha
  rises while the KL exceeds its bound and falls while it is under. A categorical policy has one
  bound (eps_alpha); a Gaussian one has two, on the decoupled mean and covariance halves of the
  KL (`kl_rl.kl.decoupled_gaussian_kl`), each with its own multiplier (alpha_mu, alpha_sigma).

The duals are learned in log space: eta = exp(log_eta) and alpha = exp(log_alpha), so they stay
positive without the paper's projection (rlax's clip at 1e-10), with their own Adam at dual_lr
(not annealed, not in the networks' gradient-norm clip). The networks take Adam steps at lr with
global-norm clipping. No entropy bonus: the covariance bound is what keeps exploration.

Metrics per update: the duals after it (`eta`, and `alpha` or `alpha_mu` and `alpha_sigma`); the
constrained KLs averaged over its gradient steps (`kl_alpha`, or `kl_mu` and `kl_sigma`); the
E-step's KL(psi || uniform) (`estep_kl`, which the temperature steers toward eps_eta); the loss
terms (`policy_loss`, `temperature_loss`, `alpha_loss`, `vf_loss`); and, as every agent, `kl`,
the exact mean KL(old || new) from the behaviour policy to the updated one over the batch.
"""

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp
import optax

from kl_rl import kl, networks
from kl_rl.agents.base import Agent, UpdateContext
from kl_rl.agents.common import (
    OnPolicyConfig, actor_critic, adam, add_reference_loss, advantages_and_returns, apply_step, check_divides,
    check_positive, explained_variance, minibatch_epochs, normalize_advantages, value_loss
)
from kl_rl.config import static
from kl_rl.errors import ConfigError


@flax.struct.dataclass
class VMPOConfig(OnPolicyConfig):
    """V-MPO hyperparameters: the on-policy rollout, minibatch epochs and the E- and M-step bounds.

    The bounds and initial duals are traced, so a sweep over them compiles one program.
    """

    update_epochs: int = static(4)
    """Passes over each batch; every step is bounded against the behaviour policy."""
    num_minibatches: int = static(4)
    """Minibatches per epoch; must divide num_envs x num_steps. The E-step ranks each minibatch."""
    top_k_fraction: float = static(0.5)
    """Fraction of each minibatch, by advantage, that the E-step keeps (the paper's top half)."""
    anneal_lr: bool = static(True)
    """Decay the networks' learning rate linearly to zero over training (not the duals')."""
    lr: float = 2.5e-4
    """Adam learning rate of the policy and value networks (initial value when annealed)."""
    dual_lr: float = 1e-2
    """Adam learning rate of log eta and the log multipliers."""
    vf_coef: float = 0.5
    """Value loss coefficient."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip of the networks' gradient."""
    eps_eta: float = 0.01
    """E-step bound: the temperature steers KL(psi || uniform over the selected samples) to it."""
    eps_alpha: float = 0.01
    """M-step bound on the mean KL(pi_old || pi_theta) of a categorical policy."""
    eps_alpha_mu: float = 0.01
    """M-step bound on the mean part of KL(pi_old || pi_theta) of a Gaussian policy (old std)."""
    eps_alpha_sigma: float = 5e-4
    """M-step bound on the covariance part of KL(pi_old || pi_theta) of a Gaussian policy (old mean)."""
    init_eta: float = 1.0
    """Initial temperature (the paper's 1)."""
    init_alpha: float = 5.0
    """Initial value of each M-step multiplier (the paper's 5)."""

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    def validate(self, action_space: gym.Space) -> None:
        """Raises ConfigError on values no run could use."""
        bounds = ("eps_eta", "eps_alpha", "eps_alpha_mu", "eps_alpha_sigma")
        floats = ("lr", "dual_lr", "max_grad_norm", *bounds, "init_eta", "init_alpha")
        self._check_on_policy(action_space, ("update_epochs", "num_minibatches"))
        check_positive(self, (), floats)
        check_divides("num_minibatches", self.num_minibatches, self.batch_size)
        if not float(self.vf_coef) >= 0.0:
            raise ConfigError(f"{{vf_coef}} must be >= 0, got {float(self.vf_coef)}", "vf_coef")
        if not 0.0 < self.top_k_fraction <= 1.0 or int(self.top_k_fraction * self.minibatch_size) < 1:
            raise ConfigError(
                f"{{top_k_fraction}} {self.top_k_fraction} must lie in (0, 1] and keep at least one of the "
                f"{self.minibatch_size} samples of a minibatch",
                "top_k_fraction",
            )


class EStep(NamedTuple):
    """The E-step of one minibatch (`e_step`)."""

    weights: jax.Array
    """psi, [B]: softmax(A / eta) over the selected samples, 0 elsewhere; no gradient."""
    temperature_loss: jax.Array
    """eta eps_eta + eta log(mean_selected exp(A / eta)); its gradient reaches only eta."""
    kl: jax.Array
    """KL(psi || uniform over the selected samples), the quantity eps_eta bounds."""


def e_step(advantages: jax.Array, eta: jax.Array, eps_eta: Any, top_k_fraction: float) -> EStep:
    """V-MPO's non-parametric E-step over a batch of advantages (Song et al. 2020).

    Keeps the samples whose advantage is at least the k-th largest, k = int(top_k_fraction B)
    (ties at the threshold are all kept, as in rlax), and weights them by softmax(A / eta).

    Args:
      advantages: A, [B]; treated as constants.
      eta: the temperature, > 0.
      eps_eta: the bound on KL(psi || uniform over the selected).
      top_k_fraction: static fraction of the batch to keep.
    """
    advantages = jax.lax.stop_gradient(advantages)
    k = max(int(top_k_fraction * advantages.shape[0]), 1)
    threshold = jnp.sort(advantages)[-k]
    selected = advantages >= threshold
    scaled = jnp.where(selected, advantages / eta, -jnp.inf)
    log_sum = jax.nn.logsumexp(scaled)
    log_count = jnp.log(jnp.sum(selected.astype(advantages.dtype)))
    temperature_loss = eta * eps_eta + eta * (log_sum - log_count)
    log_weights = jax.lax.stop_gradient(jnp.where(selected, scaled - log_sum, -jnp.inf))
    weights = jnp.exp(log_weights)
    e_kl = jnp.sum(jnp.where(selected, weights * (log_weights + log_count), 0.0))
    return EStep(weights, temperature_loss, e_kl)


class Constraint(NamedTuple):
    """One M-step bound: E_s[kl] <= epsilon, enforced by the multiplier alpha."""

    alpha: jax.Array
    kl: jax.Array
    """The constrained KL(pi_old || pi_theta) (or one of its decoupled halves) per state, [B]."""
    epsilon: Any


class VMPOLoss(NamedTuple):
    """The terms of `vmpo_loss`, each a scalar."""

    total: jax.Array
    policy_loss: jax.Array
    temperature_loss: jax.Array
    alpha_loss: jax.Array
    estep_kl: jax.Array


def vmpo_loss(
    log_prob: jax.Array, advantages: jax.Array, eta: jax.Array, eps_eta: Any, constraints: Sequence[Constraint],
    top_k_fraction: float = 0.5,
) -> VMPOLoss:  # fmt: skip
    """L_pi + L_eta + L_alpha of V-MPO (Song et al. 2020); rlax's `vmpo_loss`, averaged over the batch.

    Args:
      log_prob: log pi_theta(a|s) of the sampled actions, [B].
      advantages: A, [B].
      eta: the temperature.
      eps_eta: the E-step bound.
      constraints: the M-step bounds (one for a categorical policy; mean and covariance for a
        Gaussian), each summed in as `kl_rl.kl.kl_constraint_loss`.
      top_k_fraction: static fraction of the batch the E-step keeps.
    """
    e = e_step(advantages, eta, eps_eta, top_k_fraction)
    policy_loss = -jnp.sum(e.weights * log_prob)
    alpha_loss = sum(kl.kl_constraint_loss(c.alpha, c.kl, c.epsilon) for c in constraints)
    total = policy_loss + e.temperature_loss + alpha_loss
    return VMPOLoss(total, policy_loss, e.temperature_loss, alpha_loss, e.kl)


@flax.struct.dataclass
class VMPOState:
    """Network parameters, the log duals and both Adam states: a checkpoint restores V-MPO exactly."""

    params: dict
    duals: dict
    """log_eta and one log multiplier per M-step bound (log_alpha, or log_alpha_mu and log_alpha_sigma)."""
    opt_state: optax.OptState
    dual_opt_state: optax.OptState


def vmpo(config: VMPOConfig, observation_space: gym.Space, action_space: gym.Space) -> Agent:
    """Builds V-MPO's pure functions for one env's spaces.

    Args:
      config: hyperparameters; numeric fields may be traced.
      observation_space: single-env observation space.
      action_space: single-env action space.
    """
    ac = actor_critic(config, observation_space, action_space)
    policy_net, value_net = ac.policy_net, ac.value_net
    gaussian = networks.resolve_distribution(config.distribution, action_space) == "gaussian"
    multipliers = ("alpha_mu", "alpha_sigma") if gaussian else ("alpha",)
    bounds = (config.eps_alpha_mu, config.eps_alpha_sigma) if gaussian else (config.eps_alpha,)
    optimizer = adam(config.max_grad_norm)
    dual_optimizer = adam()

    def init(key: jax.Array) -> VMPOState:
        params = ac.init_params(key)
        duals = {"log_eta": jnp.log(jnp.asarray(config.init_eta, jnp.float32))}
        duals.update({f"log_{m}": jnp.log(jnp.asarray(config.init_alpha, jnp.float32)) for m in multipliers})
        return VMPOState(params=params, duals=duals, opt_state=optimizer.init(params),
                         dual_opt_state=dual_optimizer.init(duals))  # fmt: skip

    def loss_fn(params, duals, batch, ref_beta):
        traj, advantages, returns = batch
        dist = policy_net.apply(params["policy"], traj.obs)
        alphas = [jnp.exp(duals[f"log_{m}"]) for m in multipliers]
        kls = kl.m_step_kls(traj.dist, dist)
        constraints = [Constraint(a, d, e) for a, d, e in zip(alphas, kls, bounds, strict=True)]
        terms = vmpo_loss(dist.log_prob(traj.action), advantages, jnp.exp(duals["log_eta"]), config.eps_eta,
                          constraints, config.top_k_fraction)  # fmt: skip
        vf_loss = value_loss(value_net.apply(params["value"], traj.obs), traj.value, returns, 0.0, False)
        loss = add_reference_loss(terms.total + config.vf_coef * vf_loss, config, dist, traj, ref_beta)
        aux = {"policy_loss": terms.policy_loss, "temperature_loss": terms.temperature_loss,
               "alpha_loss": terms.alpha_loss, "estep_kl": terms.estep_kl, "vf_loss": vf_loss}  # fmt: skip
        aux.update({f"kl_{m.removeprefix('alpha_')}" if gaussian else "kl_alpha": jnp.mean(d)
                    for m, d in zip(multipliers, kls, strict=True)})  # fmt: skip
        return loss, aux

    def update(key: jax.Array, state: VMPOState, traj, ctx: UpdateContext):
        traj, advantages, returns = advantages_and_returns(lambda o: ac.value(state, o), traj, config)
        if config.normalize_advantages:
            advantages = normalize_advantages(advantages)
        lr = config.lr * (1.0 - ctx.progress) if config.anneal_lr else config.lr

        def minibatch_step(carry, minibatch):
            params, duals, opt_state, dual_opt_state = carry
            grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
            (_, aux), (grads, dual_grads) = grad_fn(params, duals, minibatch, ctx.ref_beta)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            dual_updates, dual_opt_state = dual_optimizer.update(dual_grads, dual_opt_state, duals)
            params = apply_step(params, updates, lr)
            duals = apply_step(duals, dual_updates, config.dual_lr)
            return (params, duals, opt_state, dual_opt_state), aux

        carry = (state.params, state.duals, state.opt_state, state.dual_opt_state)
        carry, aux = minibatch_epochs(
            key, minibatch_step, carry, (traj, advantages, returns), config.update_epochs, config.num_minibatches
        )
        params, duals, opt_state, dual_opt_state = carry
        new_dist = policy_net.apply(params["policy"], traj.obs)
        metrics = {k: jnp.mean(v) for k, v in aux.items()}
        metrics.update({name.removeprefix("log_"): jnp.exp(v) for name, v in duals.items()})
        metrics.update(
            kl=jnp.mean(kl.kl_old_new(traj.dist, new_dist)),
            entropy=jnp.mean(new_dist.entropy()),
            explained_variance=explained_variance(returns, traj.value),
            lr=jnp.asarray(lr, jnp.float32),
        )
        new_state = VMPOState(params=params, duals=duals, opt_state=opt_state, dual_opt_state=dual_opt_state)
        return new_state, metrics

    return Agent(init=init, act=ac.act, value=ac.value, policy=ac.policy, update=update)
