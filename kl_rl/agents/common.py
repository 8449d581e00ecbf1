"""What the algorithms share: config fields, advantage estimation, minibatch epochs, value fitting.

PPO, VPG and TRPO are the same actor-critic on the same rollout; they differ in how they move
the policy. Everything else -- the fields that shape the rollout and the networks, GAE with
truncation bootstrapping, shuffled minibatch epochs, regressing the critic on returns -- lives
here once, so a fix to any of it reaches every algorithm.
"""

import math
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, Protocol

import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp
import optax

from kl_rl import buffer, kl, networks
from kl_rl.agents.base import Agent, RolloutSpec, UpdateContext
from kl_rl.config import static
from kl_rl.errors import ConfigError
from kl_rl.returns import gae, vtrace


@flax.struct.dataclass
class PolicyConfig:
    """Fields every algorithm has: the policy network and how the final policy is evaluated."""

    hidden_sizes: tuple[int, ...] = static((64, 64))
    """Hidden layer widths of the policy (and value) MLPs."""
    network: str = static("mlp")
    """The policy network: mlp, or a recurrent cell, gru or lstm, whose state the collector
    carries between steps and resets where an episode starts (hidden_sizes[0] is the cell's
    width, the rest the head's layers; the critic is an MLP, of the observation and, with
    critic_state, of the cell's state). Recurrent
    policies are unrolled by PPO's, MDPO's, VPG's and TRPO's updates. Or cnn, for image observations
    (gymnax's MinAtar games, which then stay [10, 10, C] instead of being flattened): MinAtar's
    conv torso (16 3x3 filters, ReLU) before the hidden layers, in the policy and in the critic
    (MinAtar's own network: cnn with hidden_sizes (128,) and relu)."""
    critic_state: bool = static(False)
    """With a recurrent network: the critic, an MLP, reads the policy's carried state beside the
    observation (the state the policy acted with, as data: no gradient flows into the cell), so
    it sees the history the policy remembers, not only what one observation shows. A truncated
    step bootstraps from the state after that step. Ignored by a stateless policy. Off by
    default: on CartPoleNoVel-v1's preset it did not help (16 seeds, docs/benchmarks.md)."""
    activation: str = static("tanh")
    """Hidden activation: tanh, relu, elu or gelu."""
    distribution: str = static("auto")
    """Action distribution: auto, categorical (discrete envs only) or gaussian (Box envs)."""
    eval_episodes: int = static(16)
    """Episodes of the final policy averaged into final_return."""
    eval_deterministic: bool = static(True)
    """Evaluate with the distribution's mode instead of sampling."""
    init_log_std: float = 0.0
    """Initial log standard deviation of a Gaussian policy."""
    ref_kl_coef: float = 0.0
    """beta of the KL penalty to a frozen reference policy (needs --reference RUN_DIR); the
    initial value when a controller drives it. kl_ref is logged even at 0."""
    ref_kl_control: str = static("fixed")
    """What drives the reference penalty's beta: fixed, adaptive (halve/double around
    ref_kl_target, PPO paper sec. 4) or proportional (Ziegler et al. 2019)."""
    ref_kl_target: float = 0.05
    """KL to the reference that the adaptive and proportional controllers steer towards."""
    ref_kl_horizon: float = 10_000.0
    """Horizon of the proportional controller of the reference penalty, in transitions."""
    ref_kl_in: str = static("loss")
    """Where the reference penalty goes: loss (a term beta * mean KL in the policy loss) or
    reward (r_t - beta * KL estimate at the behaviour sample, as in TRL)."""
    ref_kl_estimator: str = static("exact")
    """exact (the per-state KL in closed form) or a one-sample estimate at the sampled action
    (Schulman 2020), l = log pi - log pi_ref: k1 = l, k2 = l^2/2, k3 = exp(-l) - 1 + l, abs = |l|.
    Expected gradients in the loss: k1 zero, k2 grad KL(pi || pi_ref), k3 grad KL(pi_ref || pi)
    (forward); k1 in the reward: grad KL(pi || pi_ref) (kl_rl.kl.anchor_kl_estimate)."""
    ref_kl_direction: str = static("reverse")
    """reverse: KL(pi || pi_ref), mode-seeking (RLHF); forward: KL(pi_ref || pi),
    mass-covering (kickstarting's distillation)."""
    env_params: dict[str, float] = flax.struct.field(default_factory=dict)
    """Overrides of the env's own parameters, by name: a port's constants (CartPole's gravity),
    gymnax's EnvParams fields (max_steps_in_episode), Brax System paths (opt.timestep). Traced,
    so a sweep or vmap can vary them. On the CLI: --env.NAME VALUE; in --grid: env.NAME=V1,V2."""

    recurrent_update: ClassVar[bool] = False
    """Whether this algorithm's update unrolls a stateful policy (`network` gru or lstm)."""
    image_networks: ClassVar[bool] = False
    """Whether this algorithm's networks can be conv nets (`network` cnn): the actor-critics'
    policy and value networks, built by `actor_critic`."""

    @property
    def recurrent(self) -> bool:
        """Whether the policy carries a state between steps (static)."""
        return self.network in networks.RECURRENT

    @property
    def images(self) -> bool:
        """Whether the networks read image observations unflattened (static)."""
        return self.network == "cnn"

    def _check_common(self, action_space: gym.Space, positive: tuple[str, ...], positive_float: tuple[str, ...]):
        check_positive(self, ("eval_episodes", *positive), positive_float)
        if any(w <= 0 for w in self.hidden_sizes):
            raise ConfigError(f"{{hidden_sizes}} must be positive widths, got {self.hidden_sizes}", "hidden_sizes")
        if self.network not in networks.NETWORKS:
            raise ConfigError(
                f"unknown {{network}} {self.network!r}; use one of {', '.join(networks.NETWORKS)}", "network"
            )
        if self.recurrent and not self.recurrent_update:
            raise ConfigError(
                f"{{network}} {self.network} needs an update that unrolls a recurrent policy (ppo, mdpo, vpg, trpo); "
                "this algorithm's policy is a function of the observation: use {network} mlp",
                "network",
            )
        if self.images and not self.image_networks:
            raise ConfigError(
                "{network} cnn is for the actor-critic agents (ppo, mdpo, vpg, trpo, awr, vmpo), whose policy and "
                "critic both take the conv torso; use {network} mlp",
                "network",
            )
        if self.recurrent and not self.hidden_sizes:
            raise ConfigError("{network} " + self.network + " needs {hidden_sizes} to name the cell's width",
                              "network", "hidden_sizes")  # fmt: skip
        networks.resolve_distribution(self.distribution, action_space)
        check_reference(self)

    def uses_reference_options(self) -> list[str]:
        """The reference flags set away from their defaults (they need --reference)."""
        return changed_reference_options(self)


@flax.struct.dataclass
class OnPolicyConfig(PolicyConfig):
    """Fields of the actor-critic algorithms (PPO, VPG, TRPO): rollout shape and returns."""

    image_networks: ClassVar[bool] = True

    total_steps: int = static(500_000)
    """Env steps to train for, summed over the parallel envs."""
    num_envs: int = static(4)
    """Parallel environments collected in lockstep."""
    num_steps: int = static(128)
    """Steps per env per rollout; a batch is num_envs x num_steps transitions."""
    normalize_obs: bool = static(False)
    """Normalize observations with running moments kept in the train state."""
    normalize_reward: bool = static(False)
    """Scale rewards by the running std of the discounted return (kept in the train state),
    clipped to [-10, 10]; episode returns and evaluation stay unscaled."""
    normalize_advantages: bool = static(True)
    """Normalize advantages to zero mean and unit std (per minibatch in PPO, per batch otherwise)."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda."""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def rollout(self) -> RolloutSpec:
        """What this config asks of the loop's rollouts."""
        return RolloutSpec(num_envs=self.num_envs, num_steps=self.num_steps, eval_episodes=self.eval_episodes,
                           normalize_obs=self.normalize_obs, normalize_reward=self.normalize_reward,
                           env_params=True)  # fmt: skip

    @property
    def num_updates(self) -> int:
        return self.total_steps // self.batch_size

    def _check_on_policy(self, action_space, positive=(), positive_float=()):
        self._check_common(action_space, ("total_steps", "num_envs", "num_steps", *positive), positive_float)
        if not 0.0 <= float(self.gamma) <= 1.0 or not 0.0 <= float(self.gae_lambda) <= 1.0:
            raise ConfigError("{gamma} and {gae_lambda} must lie in [0, 1]", "gamma", "gae_lambda")
        # num_envs x num_steps, not batch_size: an off-policy subclass (AWR) names its minibatch so.
        rollout = self.num_envs * self.num_steps
        if self.total_steps < rollout:
            raise ConfigError(
                f"{{total_steps}} {self.total_steps} is less than one batch ({rollout}); raise it "
                "or lower {num_envs} / {num_steps}",
                "total_steps",
                "num_envs",
                "num_steps",
            )


@flax.struct.dataclass
class PenalizedConfig(OnPolicyConfig):
    """An actor-critic config with a KL(old || new) penalty in the policy loss (PPO, VPG)."""

    kl_penalty: str = static("none")
    """KL(old || new) penalty in the policy loss: none, fixed (beta = kl_coef), adaptive (the PPO
    paper's halve/double rule) or proportional (Ziegler et al. 2019)."""
    kl_coef: float = 0.0
    """Initial KL penalty coefficient beta (with kl_penalty != none)."""
    kl_penalty_target: float = 0.01
    """KL the adaptive and proportional controllers steer beta towards."""
    kl_horizon: float = 10_000.0
    """Horizon of the proportional controller (Ziegler et al. 2019), in transitions."""
    replay_rollouts: int = static(1)
    """Update on the last K rollouts (K x num_envs x num_steps transitions); 1 is on-policy.
    Until K rollouts exist, the first one fills the missing places. Replayed observations keep
    the normalization they were collected with."""
    policy_lag: int = static(0)
    """Actors act with the parameters of this many updates ago (asynchronous actors), on
    observations normalized with the current moments; 0 acts with the current parameters."""
    is_correction: bool = static(True)
    """On stale data (replay_rollouts > 1 or policy_lag > 0): truncated importance weights to
    the behaviour policy in the advantages and value targets (V-trace), the current critic's
    values, and PPO's clip around the proximal policy (Hilton et al. 2021). Off: the data are
    used as if on-policy."""
    rho_clip: float = 1.0
    """V-trace's rho-bar: the truncation of the importance weight on each TD error, and of
    the weight of PPO's decoupled objective and VPG's off-policy gradient."""
    c_clip: float = 1.0
    """V-trace's c-bar: the truncation of the importance weights that carry the trace."""
    behaviour_kl_coef: float = 0.0
    """beta of a penalty beta * KL(pi_behaviour || pi) toward the policy that collected the
    data, on stale data (on fresh data the behaviour policy is the previous iterate: use
    --kl-penalty)."""

    @property
    def rollout(self) -> RolloutSpec:
        """What this config asks of the loop's rollouts: the on-policy shape, with its staleness."""
        return super().rollout._replace(policy_lag=self.policy_lag, replay_rollouts=self.replay_rollouts)

    @property
    def stale(self) -> bool:
        """Whether updates see data from other than the current policy (static)."""
        return self.replay_rollouts > 1 or self.policy_lag > 0

    def _check_on_policy(self, action_space, positive=(), positive_float=()):
        super()._check_on_policy(action_space, ("replay_rollouts", *positive), ("rho_clip", "c_clip", *positive_float))
        if self.kl_penalty not in KL_PENALTIES:
            raise ConfigError(
                f"unknown {{kl_penalty}} {self.kl_penalty!r}; use one of {', '.join(KL_PENALTIES)}", "kl_penalty"
            )
        if self.policy_lag < 0:
            raise ConfigError(f"{{policy_lag}} must be >= 0 updates, got {self.policy_lag}", "policy_lag")
        if not float(self.behaviour_kl_coef) >= 0.0:
            raise ConfigError(
                f"{{behaviour_kl_coef}} must be >= 0, got {float(self.behaviour_kl_coef)}", "behaviour_kl_coef"
            )
        if self.recurrent and self.stale:
            raise ConfigError(
                f"{{network}} {self.network} learns from fresh rollouts only: use {{policy_lag}} 0 and "
                "{replay_rollouts} 1 (or network mlp)",
                "network", "policy_lag", "replay_rollouts",
            )  # fmt: skip


@flax.struct.dataclass
class ProximalConfig(PenalizedConfig):
    """The fields of `proximal_agent`'s update (PPO, MDPO): minibatch epochs of one policy loss,
    the critic's loss and an entropy bonus, with Adam and target-KL early stopping."""

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
    """Clip range of the probability ratio (PPO; the scale of SPO's penalty), of the value update
    when clip_value, and the band outside which a ratio counts in clip_frac."""
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

    recurrent_update: ClassVar[bool] = True

    def _check_proximal(self, action_space: gym.Space, positive_float: tuple[str, ...] = ()) -> None:
        self._check_on_policy(
            action_space, ("update_epochs", "num_minibatches"), ("lr", "clip_eps", "max_grad_norm", *positive_float)
        )
        check_divides("num_minibatches", self.num_minibatches, self.batch_size)
        # Minibatches are whole envs' sequences, so the envs must split evenly.
        if self.recurrent and self.num_envs % self.num_minibatches:
            raise ConfigError(
                f"with {{network}} {self.network}, minibatches hold whole envs' sequences: {{num_minibatches}} "
                f"{self.num_minibatches} must divide {{num_envs}} {self.num_envs}",
                "network", "num_minibatches", "num_envs",
            )  # fmt: skip


KL_PENALTIES = ("none", "fixed", "adaptive", "proportional")
KL_CONTROLS = ("fixed", "adaptive", "proportional")
REFERENCE_OPTIONS = ("ref_kl_coef", "ref_kl_control", "ref_kl_target", "ref_kl_horizon", "ref_kl_in",
                     "ref_kl_estimator", "ref_kl_direction")  # fmt: skip
"""The fields of a penalty toward a frozen reference policy (`--reference`)."""


def replay_rollout(config: Any) -> RolloutSpec:
    """The rollout of an off-policy agent (MPO, AWR): num_envs x num_steps an update, added to a
    replay of config.buffer_size transitions that persists across updates."""
    return RolloutSpec(num_envs=config.num_envs, num_steps=config.num_steps, eval_episodes=config.eval_episodes,
                       normalize_obs=config.normalize_obs, env_params=True,
                       replay_capacity=config.buffer_size // config.num_envs)  # fmt: skip


def check_positive(config: Any, ints: tuple[str, ...] = (), floats: tuple[str, ...] = ()) -> None:
    """ConfigError naming the first of the `ints` fields that is not a positive integer, or of the
    `floats` fields that is not a positive finite number."""
    for name in ints:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{{{name}}} must be a positive integer, got {getattr(config, name)}", name)
    for name in floats:
        value = float(getattr(config, name))
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{{{name}}} must be a positive number, got {value}", name)


def check_reference(config: Any) -> None:
    """ConfigError for reference-penalty fields (REFERENCE_OPTIONS) no run could use."""
    for name in ("ref_kl_coef",):
        if not float(getattr(config, name)) >= 0.0:
            raise ConfigError(f"{{{name}}} must be >= 0, got {float(getattr(config, name))}", name)
    for name in ("ref_kl_target", "ref_kl_horizon"):
        if not float(getattr(config, name)) > 0.0:
            raise ConfigError(f"{{{name}}} must be > 0, got {float(getattr(config, name))}", name)
    if config.ref_kl_control not in KL_CONTROLS:
        raise ConfigError(
            f"unknown {{ref_kl_control}} {config.ref_kl_control!r}; use one of {', '.join(KL_CONTROLS)}",
            "ref_kl_control",
        )
    try:
        kl.check_anchor_options(config.ref_kl_estimator, config.ref_kl_direction, config.ref_kl_in)
    except ValueError as err:
        raise ConfigError(
            f"{{ref_kl_estimator}}/{{ref_kl_direction}}/{{ref_kl_in}}: {err}",
            "ref_kl_estimator",
            "ref_kl_direction",
            "ref_kl_in",
        ) from None


def changed_reference_options(config: Any) -> list[str]:
    """The REFERENCE_OPTIONS set away from their defaults in `config` (they need --reference)."""
    defaults = type(config)()
    return [n for n in REFERENCE_OPTIONS if getattr(config, n) != getattr(defaults, n)]


def check_divides(name: str, parts: int, batch_size: int) -> None:
    """ConfigError unless `parts` minibatches split the batch evenly."""
    if batch_size % parts:
        raise ConfigError(
            f"{{{name}}} {parts} does not divide the batch of num_envs x num_steps = "
            f"{batch_size}; pick a divisor of {batch_size}",
            name,
        )


def kl_controller(config: Any) -> kl.KLController:
    """The controller named by config.kl_penalty ("none" is a fixed beta that is never used)."""
    return _controller(config.kl_penalty, config.kl_coef, config.kl_penalty_target, config.kl_horizon)


def ref_kl_controller(config: Any) -> kl.KLController:
    """The controller of the reference penalty's beta, named by config.ref_kl_control.

    A fixed beta reads only config.ref_kl_coef: online DPO's config, whose beta is fixed, has no
    target or horizon.
    """
    if config.ref_kl_control == "fixed":
        return kl.fixed_kl_controller(config.ref_kl_coef)
    return _controller(config.ref_kl_control, config.ref_kl_coef, config.ref_kl_target, config.ref_kl_horizon)


def _controller(kind: str, beta: Any, target: Any, horizon: Any) -> kl.KLController:
    if kind == "adaptive":
        return kl.adaptive_kl_controller(beta, target)
    if kind == "proportional":
        return kl.proportional_kl_controller(beta, target, horizon)
    return kl.fixed_kl_controller(beta)


def add_reference_loss(loss: jax.Array, config: PolicyConfig, dist: Any, traj: buffer.Transition, beta: Any):
    """`loss` plus beta * mean of the reference penalty's per-sample KL term, when it goes in the loss.

    `loss` itself when the run has no reference (traj.ref_dist is None or beta is None) or the
    penalty goes in the reward (config.ref_kl_in). The term is exact per state or an estimate at
    the behaviour action (`kl.anchor_penalty`), in config.ref_kl_direction.
    """
    if traj.ref_dist is None or beta is None or config.ref_kl_in != "loss":
        return loss
    term = kl.anchor_penalty(dist, traj.ref_dist, traj.action, config.ref_kl_estimator, config.ref_kl_direction)
    return loss + beta * jnp.mean(term)


def normalize_advantages(advantages: jax.Array) -> jax.Array:
    """Zero mean, unit standard deviation; the 1e-8 keeps a constant batch finite."""
    return (advantages - advantages.mean()) / (advantages.std() + 1e-8)


def advantages_and_returns(
    value_fn: Callable[[jax.Array], jax.Array],
    traj: buffer.Transition,
    config: Any,
    log_rho: jax.Array | None = None,
):
    """GAE advantages and lambda-returns of a [T, N] trajectory, flattened to [T * N].

    The critic is evaluated on each transition's true next observation, so truncated steps
    bootstrap and terminated ones do not (see `kl_rl.returns.gae`).

    A trajectory of K replayed rollouts ([K * T, N], config.replay_rollouts = K) is estimated
    rollout by rollout, each bootstrapping at its end as a single rollout does. On stale data
    with config.is_correction, the values are the current critic's rather than the behaviour
    critic's stored at collection, and `log_rho` (log pi - log mu per step, [K * T, N]) makes
    the estimate V-trace (`kl_rl.returns.vtrace`).

    Returns:
      (flat trajectory, advantages, returns), each with a leading batch axis of T * N; on stale
      data with correction the trajectory's `value` is the current critic's. A stateful
      policy's trajectory (one with `start` flags) is not flattened but made env-major [N, T],
      so that minibatches split over envs keep each env's sequence whole.
    """
    spec = config.rollout
    stale = spec.policy_lag > 0 or spec.replay_rollouts > 1
    if stale and config.is_correction:
        traj = traj._replace(value=value_fn(traj.obs))
    else:
        log_rho = None
    # A critic of the policy's state reads next_obs with the state after the step (before any reset).
    next_state = () if traj.next_policy_state is None else (traj.next_policy_state,)
    v_tp1 = value_fn(traj.next_obs, *next_state)

    def estimate(r_t, v_t, v_tp1, terminated_t, truncated_t, log_rho_t):
        if log_rho_t is None:
            return gae(r_t, v_t, v_tp1, terminated_t, truncated_t, config.gamma, config.gae_lambda)
        return vtrace(r_t, v_t, v_tp1, terminated_t, truncated_t, log_rho_t, config.gamma, config.gae_lambda,
                      config.rho_clip, config.c_clip)  # fmt: skip

    args = (traj.reward, traj.value, v_tp1, traj.terminated, traj.truncated, log_rho)
    k = spec.replay_rollouts
    if k == 1:
        advantages, returns = estimate(*args)
    else:

        def per_rollout(x):
            return x.reshape(k, x.shape[0] // k, *x.shape[1:])

        advantages, returns = jax.vmap(estimate)(*(None if a is None else per_rollout(a) for a in args))
        advantages, returns = (x.reshape(traj.reward.shape) for x in (advantages, returns))
    if traj.start is not None:
        return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), (traj, advantages, returns))
    batch = traj.reward.size
    return jax.tree.map(lambda x: x.reshape(batch, *x.shape[2:]), (traj, advantages, returns))


class Estimates(NamedTuple):
    """What an actor-critic update learns from, flattened to [B]: `advantages_and_returns`, and on
    stale data the proximal policy (the policy before this update) against the behaviour one."""

    traj: buffer.Transition
    advantages: jax.Array
    returns: jax.Array
    prox_dist: Any
    """The proximal policy's distribution at each state; None on fresh data."""
    log_rho: jax.Array | None
    """log pi_prox(a) - log mu(a), mu the behaviour policy; None on fresh data."""
    prox: tuple | None
    """(log pi_prox(a), prox_dist) on corrected stale data (the anchor of the clip and of the
    previous-iterate KL); None otherwise."""


def estimates(policy_net: networks.Network, policy_params: Any, value_fn: Callable, traj: buffer.Transition,
              config: Any) -> Estimates:  # fmt: skip
    """Advantages and returns of a [T, N] trajectory, and on stale data (config.stale) the
    proximal policy's weights to the behaviour policy, which V-trace uses when
    config.is_correction."""
    prox_dist = log_rho = prox = None
    if config.stale:
        prox_dist = policy_net.apply(policy_params, traj.obs)
        log_rho = prox_dist.log_prob(traj.action) - traj.log_prob
    traj, advantages, returns = advantages_and_returns(value_fn, traj, config, log_rho)
    if config.stale:
        batch = returns.shape[0]
        prox_dist, log_rho = jax.tree.map(lambda x: x.reshape(batch, *x.shape[2:]), (prox_dist, log_rho))
        if config.is_correction:
            prox = (log_rho + traj.log_prob, prox_dist)
    return Estimates(traj, advantages, returns, prox_dist, log_rho, prox)


def value_loss(
    value: jax.Array, value_old: jax.Array, returns: jax.Array, clip_eps: jax.Array, clip: bool
) -> jax.Array:
    """0.5 E[(V - R)^2]; with `clip`, the max with the error of V clipped to value_old +/- eps (PPO2)."""
    err = jnp.square(value - returns)
    if clip:
        clipped = value_old + jnp.clip(value - value_old, -clip_eps, clip_eps)
        err = jnp.maximum(err, jnp.square(clipped - returns))
    return 0.5 * jnp.mean(err)


def explained_variance(returns: jax.Array, values: jax.Array) -> jax.Array:
    """1 - Var[R - V] / Var[R]: 1 for a perfect critic, 0 for a constant one."""
    return 1.0 - jnp.var(returns - values) / (jnp.var(returns) + 1e-8)


def minibatch_epochs(key: jax.Array, step: Callable, carry: Any, data: Any, epochs: int, num_minibatches: int):
    """`epochs` passes of `step(carry, minibatch) -> (carry, aux)` over shuffled minibatches.

    Args:
      key: PRNG key for the shuffles (one permutation per epoch).
      step: the per-minibatch update.
      carry: its initial carry (parameters, optimizer state, ...).
      data: pytree with a leading batch axis B; num_minibatches must divide B.
      epochs, num_minibatches: static counts.

    Returns:
      (final carry, aux stacked to [epochs, num_minibatches, ...]).
    """
    batch = jax.tree.leaves(data)[0].shape[0]
    size = batch // num_minibatches

    def epoch(carry, epoch_key):
        perm = jax.random.permutation(epoch_key, batch)
        shuffled = jax.tree.map(lambda x: x[perm].reshape(num_minibatches, size, *x.shape[1:]), data)
        return jax.lax.scan(step, carry, shuffled)

    return jax.lax.scan(epoch, carry, jax.random.split(key, epochs))


def adam(max_grad_norm: Any = None) -> optax.GradientTransformation:
    """Adam direction (eps 1e-5), after global-norm clipping when max_grad_norm is given.

    The learning rate is applied by the caller, so it can be a traced, annealed value.
    """
    scale = optax.scale_by_adam(eps=1e-5)
    return scale if max_grad_norm is None else optax.chain(optax.clip_by_global_norm(max_grad_norm), scale)


def apply_step(params: Any, updates: Any, lr: jax.Array) -> Any:
    """params - lr * updates, leaf by leaf."""
    return jax.tree.map(lambda p, u: p - lr * u, params, updates)


def value_regression_data(config: PolicyConfig, obs: jax.Array, returns: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(obs, returns) for `fit_value`: as given, or a recurrent policy's env-major [N, T] batch
    flattened to [N * T] -- the critic is an MLP (of `ActorCritic.critic_input`: the observation,
    and with critic_state the policy's recorded state), so its regression needs no sequences and
    its minibatches are of steps, as for a stateless policy."""
    if not config.recurrent:
        return obs, returns
    return obs.reshape(-1, *obs.shape[2:]), returns.reshape(-1)


def fit_value(
    key: jax.Array,
    value_net: networks.Network,
    params: Any,
    opt_state: Any,
    optimizer: optax.GradientTransformation,
    lr: jax.Array,
    obs: jax.Array,
    returns: jax.Array,
    epochs: int,
    num_minibatches: int,
):
    """Regresses the critic on returns with `epochs` passes of minibatch Adam (Spinning Up style).

    Returns:
      (params, opt_state, the value loss 0.5 (V - R)^2 averaged over all steps).
    """

    def loss(p, batch):
        o, r = batch
        return 0.5 * jnp.mean(jnp.square(value_net.apply(p, o) - r))

    def step(carry, batch):
        p, s = carry
        value, grads = jax.value_and_grad(loss)(p, batch)
        updates, s = optimizer.update(grads, s, p)
        return (apply_step(p, updates, lr), s), value

    carry = (params, opt_state)
    (params, opt_state), losses = minibatch_epochs(key, step, carry, (obs, returns), epochs, num_minibatches)
    return params, opt_state, jnp.mean(losses)


class ActorCritic(NamedTuple):
    """A policy network and a value MLP, and the agent functions that only read their parameters.

    `policy`, `act` and `value` take any agent state with a `params` dict holding "policy" and
    "value", so PPO, VPG and TRPO share them. A stateful policy's `policy` and `act` take and
    return its state (`kl_rl.agents.base.Agent`), and `initial_state` is not None.
    """

    policy_net: networks.Network
    value_net: networks.Network
    init_params: Callable[[jax.Array], dict]
    policy: Callable[..., Any]
    act: Callable[..., tuple]
    value: Callable[..., jax.Array]
    """value(state, obs[, policy_state]) -> V; a recurrent policy's critic with `critic_state`
    reads the state the policy acted with on obs."""
    distribution: Callable[[Any, buffer.Transition], Any]
    """distribution(policy_params, traj) -> the policy's distribution at every step of an update's
    data: of each observation, or for a stateful policy unrolled along env-major [N, T]
    sequences from each env's first recorded state, reset where `traj.start` says."""
    critic_input: Callable[[jax.Array, Any], jax.Array]
    """critic_input(obs, policy_state) -> what the value MLP reads: obs, or with `critic_state`
    obs (flattened) beside the policy's state at the same steps."""
    initial_state: Callable[[int], Any] | None = None


def critic_input(obs: jax.Array, policy_state: Any) -> jax.Array:
    """The observation, flattened past the batch axes, beside a policy state's leaves (a GRU's
    h, an LSTM's c and h), as one array: the input of a critic of the policy's state."""
    if policy_state is None:
        return obs
    leaves = jax.tree.leaves(policy_state)
    batch = leaves[0].shape[:-1]
    parts = [obs.reshape(*batch, -1), *(jax.lax.stop_gradient(x).reshape(*batch, -1) for x in leaves)]
    return jnp.concatenate([p.astype(jnp.float32) for p in parts], -1)


def actor_critic(config: PolicyConfig, observation_space: gym.Space, action_space: gym.Space) -> ActorCritic:
    """The networks named by `config` for one env's spaces, with their init, policy, act and value."""
    policy_net = networks.make_policy(
        action_space, config.hidden_sizes, config.activation, config.distribution, config.init_log_std,
        config.network,
    )  # fmt: skip
    value_net = networks.make_value(config.hidden_sizes, config.activation, config.network)

    reads_state = config.critic_state and config.recurrent

    def value_input(obs: jax.Array, policy_state: Any = None) -> jax.Array:
        return critic_input(obs, policy_state) if reads_state else obs

    def init_params(key: jax.Array) -> dict:
        policy_key, value_key = jax.random.split(key)
        obs = jnp.zeros((1, *observation_space.shape), jnp.float32)
        state = policy_net.initial_state(1) if reads_state else None
        return {"policy": policy_net.init(policy_key, obs), "value": value_net.init(value_key, value_input(obs, state))}

    def value(state: Any, obs: jax.Array, policy_state: Any = None) -> jax.Array:
        if reads_state and policy_state is None:
            raise ValueError("this critic reads the policy's state: call value(state, obs, policy_state)")
        return value_net.apply(state.params["value"], value_input(obs, policy_state))

    if policy_net.initial_state is None:
        policy, act = policy_and_act(policy_net)

        def distribution(params: Any, traj: buffer.Transition):
            return policy_net.apply(params, traj.obs)

        return ActorCritic(policy_net, value_net, init_params, policy, act, value, distribution, value_input)

    def recurrent_policy(state: Any, obs: jax.Array, policy_state: Any):
        return policy_net.apply(state.params["policy"], obs, policy_state)

    def recurrent_act(key: jax.Array, state: Any, obs: jax.Array, policy_state: Any):
        dist, policy_state = recurrent_policy(state, obs, policy_state)
        action = dist.sample(key)
        return action, dist.log_prob(action), dist, policy_state

    def unrolled(params: Any, traj: buffer.Transition):
        first = jax.tree.map(lambda x: x[:, 0], traj.policy_state)
        return networks.unroll(policy_net, params, first, traj.obs, traj.start)

    return ActorCritic(policy_net, value_net, init_params, recurrent_policy, recurrent_act, value, unrolled,
                       value_input, policy_net.initial_state)  # fmt: skip


def policy_and_act(policy_net: networks.Network) -> tuple[Callable, Callable]:
    """An agent's policy(state, obs) -> dist and act(key, state, obs) -> (action, log_prob, dist)
    for a stateless policy network whose params are the agent state's params["policy"]."""

    def policy(state: Any, obs: jax.Array):
        return policy_net.apply(state.params["policy"], obs)

    def act(key: jax.Array, state: Any, obs: jax.Array):
        dist = policy(state, obs)
        action = dist.sample(key)
        return action, dist.log_prob(action), dist

    return policy, act


class PolicyLoss(Protocol):
    """The policy term of `proximal_agent`'s minibatch loss: (loss, metrics averaged per update).

    log_ratio: log pi(a) - log pi_anchor(a), [B]; advantages: [B] (normalized when the config
    says so); weight: the truncated ratio pi_prox / pi_behaviour on corrected stale data, else
    None; dist, anchor: the policy being optimized and the anchor (the policy at the start of
    the update); progress: the fraction of training done before this update.
    """

    def __call__(
        self, log_ratio: jax.Array, advantages: jax.Array, weight: jax.Array | None, dist: Any, anchor: Any,
        progress: jax.Array,
    ) -> tuple[jax.Array, dict[str, jax.Array]]: ...


@flax.struct.dataclass
class PPOState:
    """Everything a `proximal_agent` update changes; checkpointing this restores the agent exactly."""

    params: dict
    opt_state: optax.OptState
    kl_ctrl: kl.KLControllerState


def proximal_agent(
    config: ProximalConfig, observation_space: gym.Space, action_space: gym.Space, policy_loss: PolicyLoss
) -> Agent:
    """An actor-critic whose update takes minibatch epochs of `policy_loss` (PPO, MDPO).

    Around the policy term: the value loss, the entropy bonus, the optional KL(old || new) penalty
    (config.kl_penalty), the behaviour penalty on stale data, the reference penalty, target-KL
    early stopping and, on corrected stale data, the proximal policy as the anchor (decoupled
    PPO, Hilton et al. 2021). See `kl_rl.agents.ppo` for what each does.

    Args:
      config: hyperparameters; numeric fields may be traced.
      observation_space: single-env observation space.
      action_space: single-env action space.
      policy_loss: the policy term and its metrics, per minibatch.
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

    def loss_fn(params, batch, beta, ref_beta, progress):
        traj, advantages, returns, prox = batch
        dist = ac.distribution(params["policy"], traj)
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
        pg_loss, pg_aux = policy_loss(log_ratio, advantages, weight, dist, anchor_dist, progress)
        value = value_net.apply(params["value"], ac.critic_input(traj.obs, traj.policy_state))
        vf_loss = value_loss(value, traj.value, returns, config.clip_eps, config.clip_value)
        entropy = jnp.mean(dist.entropy())
        approx_kl = jnp.mean(kl.kl_k3(log_prob, anchor_log_prob))
        loss = pg_loss + config.vf_coef * vf_loss - config.ent_coef * entropy
        if use_penalty:
            loss = loss + kl.kl_penalty_loss(beta, kl.kl_old_new(anchor_dist, dist))
        if stale:
            loss = loss + kl.kl_penalty_loss(config.behaviour_kl_coef, kl.kl_old_new(traj.dist, dist))
        loss = add_reference_loss(loss, config, dist, traj, ref_beta)
        aux = {"pg_loss": pg_loss, "vf_loss": vf_loss, "entropy_loss": -entropy, "approx_kl_k3": approx_kl, **pg_aux}
        return loss, aux

    def update(key: jax.Array, state: PPOState, traj, ctx: UpdateContext):
        ref_beta = ctx.ref_beta
        params = state.params
        est = estimates(policy_net, params["policy"], lambda obs, *s: ac.value(state, obs, *s), traj, config)
        traj, advantages, returns, prox_dist, log_rho, prox = est
        lr = config.lr * (1.0 - ctx.progress) if config.anneal_lr else config.lr
        beta = state.kl_ctrl.beta

        def minibatch_step(carry, minibatch):
            params, opt_state, stopped = carry
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (_, aux), grads = grad_fn(params, minibatch, beta, ref_beta, ctx.progress)
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

        new_dist = ac.distribution(params["policy"], traj)
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

    return Agent(init=init, act=ac.act, value=ac.value, policy=ac.policy, update=update,
                 initial_state=ac.initial_state)  # fmt: skip
