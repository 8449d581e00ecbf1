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
"""

import math

import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp
import optax

from kl_rl import buffer, kl, networks
from kl_rl.agents.base import Agent
from kl_rl.config import static
from kl_rl.errors import ConfigError


@flax.struct.dataclass
class PPOConfig:
    """PPO hyperparameters. Defaults are PureJaxRL's `ppo.py` CartPole settings."""

    total_steps: int = static(500_000)
    """Env steps to train for, summed over the parallel envs."""
    num_envs: int = static(4)
    """Parallel environments collected in lockstep."""
    num_steps: int = static(128)
    """Steps per env per rollout; a batch is num_envs x num_steps transitions."""
    update_epochs: int = static(4)
    """Passes over each batch."""
    num_minibatches: int = static(4)
    """Minibatches per epoch; must divide num_envs x num_steps."""
    hidden_sizes: tuple[int, ...] = static((64, 64))
    """Hidden layer widths of the policy and value MLPs."""
    activation: str = static("tanh")
    """Hidden activation: tanh, relu, elu or gelu."""
    distribution: str = static("auto")
    """Action distribution: auto, categorical (discrete envs only) or gaussian (Box envs)."""
    normalize_obs: bool = static(False)
    """Normalize observations with running moments kept in the train state."""
    normalize_advantages: bool = static(True)
    """Normalize advantages to zero mean, unit std within each minibatch."""
    clip_value: bool = static(False)
    """Clip the value update to +/- clip_eps around the behaviour value (PPO2 / PureJaxRL)."""
    anneal_lr: bool = static(True)
    """Decay the learning rate linearly to zero over training."""
    kl_penalty: str = static("none")
    """KL(old || new) penalty in the loss: none, fixed (beta = kl_coef), adaptive (the PPO paper's
    halve/double rule) or proportional (Ziegler et al. 2019)."""
    eval_episodes: int = static(16)
    """Episodes of the final policy averaged into final_return."""
    eval_deterministic: bool = static(True)
    """Evaluate with the distribution's mode instead of sampling."""
    lr: float = 2.5e-4
    """Adam learning rate (initial value when annealed)."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda."""
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
    kl_coef: float = 0.0
    """Initial KL penalty coefficient beta (with kl_penalty != none)."""
    kl_penalty_target: float = 0.01
    """KL the adaptive and proportional controllers steer beta towards."""
    kl_horizon: float = 10_000.0
    """Horizon of the proportional controller (Ziegler et al. 2019), in transitions."""
    init_log_std: float = 0.0
    """Initial log standard deviation of a Gaussian policy."""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_updates(self) -> int:
        return self.total_steps // self.batch_size

    def validate(self, action_space: gym.Space) -> None:
        """Raises ConfigError on values no run could use."""
        for name in ("total_steps", "num_envs", "num_steps", "update_epochs", "num_minibatches", "eval_episodes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        for name in ("lr", "clip_eps", "max_grad_norm"):
            value = float(getattr(self, name))
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
        if not 0.0 <= float(self.gamma) <= 1.0 or not 0.0 <= float(self.gae_lambda) <= 1.0:
            raise ConfigError("--gamma and --gae-lambda must lie in [0, 1]")
        if any(w <= 0 for w in self.hidden_sizes):
            raise ConfigError(f"--hidden-sizes must be positive widths, got {self.hidden_sizes}")
        if self.batch_size % self.num_minibatches:
            raise ConfigError(
                f"--num-minibatches {self.num_minibatches} does not divide the batch of "
                f"num_envs x num_steps = {self.batch_size}; pick a divisor of {self.batch_size}"
            )
        if self.total_steps < self.batch_size:
            raise ConfigError(
                f"--total-steps {self.total_steps} is less than one batch ({self.batch_size}); raise it "
                "or lower --num-envs / --num-steps"
            )
        if self.kl_penalty not in KL_PENALTIES:
            raise ConfigError(f"unknown --kl-penalty {self.kl_penalty!r}; use one of {', '.join(KL_PENALTIES)}")
        networks.resolve_distribution(self.distribution, action_space)


KL_PENALTIES = ("none", "fixed", "adaptive", "proportional")


@flax.struct.dataclass
class PPOState:
    """Everything an update changes; checkpointing this restores the agent exactly."""

    params: dict
    opt_state: optax.OptState
    kl_ctrl: kl.KLControllerState


def kl_controller(config: PPOConfig) -> kl.KLController:
    """The controller named by config.kl_penalty ("none" is a fixed beta that is never used)."""
    if config.kl_penalty == "adaptive":
        return kl.adaptive_kl_controller(config.kl_coef, config.kl_penalty_target)
    if config.kl_penalty == "proportional":
        return kl.proportional_kl_controller(config.kl_coef, config.kl_penalty_target, config.kl_horizon)
    return kl.fixed_kl_controller(config.kl_coef)


def clipped_surrogate_loss(log_ratio: jax.Array, advantages: jax.Array, clip_eps: jax.Array) -> jax.Array:
    """-E[min(r A, clip(r, 1 - eps, 1 + eps) A)] with r = exp(log_ratio) (PPO paper, eq. 7)."""
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return -jnp.mean(jnp.minimum(ratio * advantages, clipped * advantages))


def value_loss(
    value: jax.Array, value_old: jax.Array, returns: jax.Array, clip_eps: jax.Array, clip: bool
) -> jax.Array:
    """0.5 E[(V - R)^2]; with `clip`, the max with the error of V clipped to value_old +/- eps (PPO2)."""
    err = jnp.square(value - returns)
    if clip:
        clipped = value_old + jnp.clip(value - value_old, -clip_eps, clip_eps)
        err = jnp.maximum(err, jnp.square(clipped - returns))
    return 0.5 * jnp.mean(err)


def normalize_advantages(advantages: jax.Array) -> jax.Array:
    """Zero mean, unit standard deviation; the 1e-8 keeps a constant batch finite."""
    return (advantages - advantages.mean()) / (advantages.std() + 1e-8)


def ppo(config: PPOConfig, observation_space: gym.Space, action_space: gym.Space) -> Agent:
    """Builds PPO's pure functions for one env's spaces.

    Args:
      config: hyperparameters; numeric fields may be traced.
      observation_space: single-env observation space.
      action_space: single-env action space.
    """
    policy_net = networks.make_policy(
        action_space, config.hidden_sizes, config.activation, config.distribution, config.init_log_std
    )
    value_net = networks.make_value(config.hidden_sizes, config.activation)
    optimizer = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.scale_by_adam(eps=1e-5))
    controller = kl_controller(config)
    use_penalty = config.kl_penalty != "none"

    def init(key: jax.Array) -> PPOState:
        policy_key, value_key = jax.random.split(key)
        obs = jnp.zeros((1, *observation_space.shape), jnp.float32)
        params = {"policy": policy_net.init(policy_key, obs), "value": value_net.init(value_key, obs)}
        return PPOState(params=params, opt_state=optimizer.init(params), kl_ctrl=controller.init())

    def policy(state: PPOState, obs: jax.Array):
        return policy_net.apply(state.params["policy"], obs)

    def act(key: jax.Array, state: PPOState, obs: jax.Array):
        dist = policy(state, obs)
        action = dist.sample(key)
        return action, dist.log_prob(action), dist

    def value(state: PPOState, obs: jax.Array) -> jax.Array:
        return value_net.apply(state.params["value"], obs)

    def loss_fn(params, batch, beta):
        traj, advantages, returns = batch
        dist = policy_net.apply(params["policy"], traj.obs)
        log_prob = dist.log_prob(traj.action)
        log_ratio = log_prob - traj.log_prob
        if config.normalize_advantages:
            advantages = normalize_advantages(advantages)
        pg_loss = clipped_surrogate_loss(log_ratio, advantages, config.clip_eps)
        value = value_net.apply(params["value"], traj.obs)
        vf_loss = value_loss(value, traj.value, returns, config.clip_eps, config.clip_value)
        entropy = jnp.mean(dist.entropy())
        approx_kl = jnp.mean(kl.kl_k3(log_prob, traj.log_prob))
        loss = pg_loss + config.vf_coef * vf_loss - config.ent_coef * entropy
        if use_penalty:
            loss = loss + kl.kl_penalty_loss(beta, kl.kl_old_new(traj.dist, dist))
        aux = {
            "pg_loss": pg_loss,
            "vf_loss": vf_loss,
            "entropy_loss": -entropy,
            "approx_kl_k3": approx_kl,
            "clip_frac": jnp.mean((jnp.abs(jnp.exp(log_ratio) - 1.0) > config.clip_eps).astype(jnp.float32)),
        }
        return loss, aux

    def update(key: jax.Array, state: PPOState, traj, progress: jax.Array):
        params = state.params
        v_tp1 = value_net.apply(params["value"], traj.next_obs)
        advantages, returns = buffer.gae(
            traj.reward, traj.value, v_tp1, traj.terminated, traj.truncated, config.gamma, config.gae_lambda
        )
        flat = jax.tree.map(lambda x: x.reshape(config.batch_size, *x.shape[2:]), (traj, advantages, returns))
        lr = config.lr * (1.0 - progress) if config.anneal_lr else config.lr
        beta = state.kl_ctrl.beta

        def minibatch_step(carry, minibatch):
            params, opt_state, stopped = carry
            (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, minibatch, beta)
            stopped = stopped | (config.target_kl > 0) & (aux["approx_kl_k3"] > 1.5 * config.target_kl)
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            new_params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
            def keep(new, old):
                return jax.tree.map(lambda n, o: jnp.where(stopped, o, n), new, old)

            carry = (keep(new_params, params), keep(new_opt_state, opt_state), stopped)
            return carry, {**aux, "grad_steps": 1.0 - stopped.astype(jnp.float32)}

        def epoch(carry, epoch_key):
            perm = jax.random.permutation(epoch_key, config.batch_size)
            shuffled = jax.tree.map(
                lambda x: x[perm].reshape(config.num_minibatches, config.minibatch_size, *x.shape[1:]), flat
            )
            return jax.lax.scan(minibatch_step, carry, shuffled)

        carry = (params, state.opt_state, jnp.asarray(False))
        (params, opt_state, stopped), aux = jax.lax.scan(epoch, carry, jax.random.split(key, config.update_epochs))

        new_dist = policy_net.apply(params["policy"], flat[0].obs)
        kl_batch = jnp.mean(kl.kl_old_new(flat[0].dist, new_dist))
        kl_ctrl = controller.update(state.kl_ctrl, kl_batch, config.batch_size)
        metrics = {k: jnp.mean(v) for k, v in aux.items() if k != "grad_steps"}
        explained = 1.0 - jnp.var(returns - traj.value) / (jnp.var(returns) + 1e-8)
        metrics.update(
            kl=kl_batch,
            entropy=jnp.mean(new_dist.entropy()),
            grad_steps=jnp.sum(aux["grad_steps"]),
            early_stopped=stopped.astype(jnp.float32),
            explained_variance=explained,
            beta=state.kl_ctrl.beta,
            lr=jnp.asarray(lr, jnp.float32),
        )
        return PPOState(params=params, opt_state=opt_state, kl_ctrl=kl_ctrl), metrics

    return Agent(init=init, act=act, value=value, policy=policy, update=update)
