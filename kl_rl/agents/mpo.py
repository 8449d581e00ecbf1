"""Maximum a posteriori Policy Optimisation (Abdolmaleki et al., ICLR 2018, arXiv:1806.06920).

Off-policy: a Q critic learned from the replay buffer that persists in the loop's train state
(`RolloutSpec.replay_capacity`), and a policy improved by EM-style policy iteration in which
both steps are held by a KL leash. Each gradient step, on a batch of windows drawn uniformly
from the buffer (`kl_rl.buffer.sample_windows`):

1. Critic: Q(s_0, a_0) regresses on a target of the window, `critic_target`:
   - "n_step" (default): the n-step target (`kl_rl.returns.n_step_targets`): rewards up to the
     first step m whose episode ends, then gamma^(m+1) V'(s'_m), where V' is the target
     networks' E_{a ~ pi'}[Q'(s'_m, a)]: a truncated step bootstraps, a terminated one does not.
     No importance weights: Acme's choice (Hoffman et al. 2020, arXiv:2006.00979).
   - "retrace": the paper's Retrace target (Munos et al. 2016, arXiv:1606.02647;
     `kl_rl.returns.retrace_targets`), Q'(s_0, a_0) + sum_j gamma^j (prod_{i=1..j} c_i) delta_j
     with delta_j = r_j + gamma (1 - terminated_j) V'(s'_j) - Q'(s_j, a_j) and
     c_i = retrace_lambda min(1, pi'(a_i|s_i) / mu(a_i|s_i)), mu the behaviour's log_prob stored
     in the buffer, cut at the same first done step. It evaluates Q', V' and pi' at every step of
     the window (V' at n x batch_size states, N actions each, where n_step needs batch_size),
     so each gradient step costs more. The weights are taken on the stored (unclipped) Gaussian
     sample, whose density the behaviour's log_prob is; the critic sees the clipped action.
     Logged: `retrace_weight` (mean min(1, pi'/mu)) and `behaviour_kl` (E_mu[log mu - log pi']).
2. E-step (sec. 4.1): at each state, N actions sampled from the target policy pi' (for a
   categorical policy: every action, weighted by pi'), and the non-parametric improved policy
   q(a|s) proportional to pi'(a|s) exp(Q'(s, a) / eta), whose KL(q || pi') is held at most
   `epsilon` on average. The temperature eta solves the convex dual (eq. 9)
   g(eta) = eta epsilon + eta E_s[log E_{a ~ pi'} exp(Q'(s, a) / eta)], minimized by gradient
   steps on log eta.
3. M-step (sec. 4.2): weighted maximum likelihood, max E_s E_q[log pi(a|s)], subject to
   E_s[KL(pi' || pi)] <= epsilon_mean (direction `kl_rl.kl.kl_old_new`), the constraint made a
   Lagrangian with multiplier alpha (log-space param, `kl.kl_constraint_loss`): the policy
   minimizes the loss plus sg(alpha) KL, alpha minimizes alpha (epsilon_mean - sg(KL)), so alpha
   rises while KL exceeds its bound and falls below it. A Gaussian policy's KL is decoupled (sec. 4.2.1; Abdolmaleki
   et al. 2018b, arXiv:1812.02256): the mean, with pi's mean and pi''s std, bounded by
   epsilon_mean; the std, with pi''s mean and pi's std, bounded by epsilon_std
   (`kl.m_step_kls`, the halves V-MPO bounds too), each with its own multiplier, so exploration does not
   collapse through the covariance while the mean moves.

The target networks (policy pi' and critic Q') are hard copies of the online ones every
`target_period` gradient steps. Every dual variable is logged each update (`temperature`,
`alpha_mean`, `alpha_std` or `alpha`), with the KLs they hold (`kl_mean`, `kl_std`, `e_step_kl`).
The KL bounds are traced config fields: a sweep over them is one compiled program.
"""

import math
import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp

from kl_rl import buffer, kl, networks
from kl_rl.agents.base import Agent, RolloutSpec, UpdateContext
from kl_rl.agents.common import PolicyConfig, adam, apply_step, policy_and_act, replay_rollout
from kl_rl.config import static
from kl_rl.distributions import DiagGaussian
from kl_rl.errors import ConfigError
from kl_rl.returns import n_step_targets, retrace_targets

# Floor of the log-space duals (Acme's MIN_LOG_TEMPERATURE / MIN_LOG_ALPHA): a dual can fall to
# ~1.5e-8 and still move back up within a few hundred Adam steps.
_MIN_LOG_DUAL = -18.0

# The critic's targets of a replayed window (`MPOConfig.critic_target`).
CRITIC_TARGETS = ("n_step", "retrace")


@flax.struct.dataclass
class MPOConfig(PolicyConfig):
    """MPO hyperparameters. The E-step bound 0.1 is Acme's MPO default; the M-step bounds (0.01
    on the mean part or a categorical's KL, 1e-5 on the std part, each a KL summed over action
    dimensions) and the duals' first values are untuned choices."""

    hidden_sizes: tuple[int, ...] = static((256, 256))
    """Hidden layer widths of the policy and the Q critic."""
    activation: str = static("elu")
    """Hidden activation: tanh, relu, elu or gelu."""
    total_steps: int = static(100_000)
    """Env steps to train for, summed over the parallel envs."""
    num_envs: int = static(4)
    """Parallel environments collected in lockstep."""
    num_steps: int = static(16)
    """Steps per env per rollout; each update adds num_envs x num_steps transitions to the buffer."""
    normalize_obs: bool = static(False)
    """Normalize observations with running moments; replayed observations keep the moments they
    were collected with, so leave it off unless the scales demand it."""
    buffer_size: int = static(1_000_000)
    """Transitions the replay buffer holds (the oldest are overwritten)."""
    batch_size: int = static(256)
    """Windows per gradient step."""
    utd_ratio: float = static(1.0)
    """Update-to-data ratio: gradient steps per env step collected (each update takes
    round(utd_ratio x num_envs x num_steps) of them)."""
    learning_starts: int = static(1_000)
    """Env steps collected before the first gradient step."""
    n_step: int = static(5)
    """Steps of the critic's n-step (or Retrace) target window."""
    critic_target: str = static("n_step")
    """The critic's target of a window: "n_step" (uncorrected n-step return, Acme's choice) or
    "retrace" (Munos et al. 2016, the paper's; costs n times the target-critic calls)."""
    num_action_samples: int = static(20)
    """N, actions sampled per state in the E-step and in the bootstrap's E_{a ~ pi'}[Q'] (a
    categorical policy enumerates its actions instead)."""
    target_period: int = static(100)
    """Gradient steps between copies of the online networks into the target networks."""
    gamma: float = 0.99
    """Discount factor."""
    lr: float = 3e-4
    """Adam learning rate of the policy."""
    critic_lr: float = 3e-4
    """Adam learning rate of the Q critic."""
    dual_lr: float = 1e-2
    """Adam learning rate of the log-space duals (temperature and multipliers)."""
    max_grad_norm: float = 40.0
    """Gradient-norm clip of the policy's and of the critic's gradients, each on its own."""
    epsilon: float = 0.1
    """E-step bound on E_s[KL(q || pi')], held by the temperature eta."""
    epsilon_mean: float = 0.01
    """M-step bound on E_s[KL(pi' || pi)] of a Gaussian's mean part, or of a categorical's KL."""
    epsilon_std: float = 1e-5
    """M-step bound on E_s[KL(pi' || pi)] of a Gaussian's std part."""
    init_temperature: float = 1.0
    """eta's first value."""
    init_alpha_mean: float = 1.0
    """The first value of the multiplier of the mean (or categorical) KL constraint."""
    init_alpha_std: float = 100.0
    """The first value of the multiplier of the std KL constraint."""
    retrace_lambda: float = 1.0
    """Retrace's lambda in c_i = lambda min(1, pi'/mu) (the paper's c_i has none: 1); used only
    with critic_target "retrace"."""

    @property
    def grad_steps(self) -> int:
        """Gradient steps per update: utd_ratio x the transitions one update collects."""
        return round(self.utd_ratio * self.num_envs * self.num_steps)

    @property
    def num_updates(self) -> int:
        return self.total_steps // (self.num_envs * self.num_steps)

    @property
    def rollout(self) -> RolloutSpec:
        """Rollouts of num_envs x num_steps added to a replay of buffer_size transitions."""
        return replay_rollout(self)

    def validate(self, action_space: gym.Space) -> None:
        """Raises ConfigError on values no run could use."""
        self._check_common(
            action_space,
            ("total_steps", "num_envs", "num_steps", "buffer_size", "batch_size", "n_step", "num_action_samples",
             "target_period"),
            ("lr", "critic_lr", "dual_lr", "max_grad_norm", "epsilon", "epsilon_mean", "epsilon_std", "utd_ratio",
             "init_temperature", "init_alpha_mean", "init_alpha_std"),
        )  # fmt: skip
        if not 0.0 <= float(self.gamma) <= 1.0:
            raise ConfigError(f"{{gamma}} must lie in [0, 1], got {float(self.gamma)}", "gamma")
        if self.critic_target not in CRITIC_TARGETS:
            raise ConfigError(
                f"unknown {{critic_target}} {self.critic_target!r}; use one of {', '.join(CRITIC_TARGETS)}",
                "critic_target",
            )
        if not 0.0 <= float(self.retrace_lambda) <= 1.0:
            raise ConfigError(f"{{retrace_lambda}} must lie in [0, 1], got {float(self.retrace_lambda)}",
                              "retrace_lambda")  # fmt: skip
        if self.learning_starts < 0:
            raise ConfigError(f"{{learning_starts}} must be >= 0, got {self.learning_starts}", "learning_starts")
        rollout = self.num_envs * self.num_steps
        if self.total_steps < rollout:
            raise ConfigError(
                f"{{total_steps}} {self.total_steps} is less than one rollout ({rollout}); raise it or lower "
                "{num_envs} / {num_steps}",
                "total_steps", "num_envs", "num_steps",
            )  # fmt: skip
        if self.buffer_size // self.num_envs < max(self.num_steps, self.n_step):
            raise ConfigError(
                f"{{buffer_size}} {self.buffer_size} holds fewer than one rollout ({rollout} transitions) or one "
                f"{{n_step}} window per env; raise it to at least {self.num_envs * max(self.num_steps, self.n_step)}",
                "buffer_size", "n_step",
            )  # fmt: skip
        if self.grad_steps < 1:
            raise ConfigError(
                f"{{utd_ratio}} {float(self.utd_ratio)} gives no gradient step per update of {rollout} env steps; "
                f"raise it to at least {1 / rollout:.3g}",
                "utd_ratio",
            )
        if self.ref_kl_coef != 0.0 or self.uses_reference_options():
            raise ConfigError(
                "mpo takes no frozen reference penalty; leave the {ref_kl_coef} options unset", "ref_kl_coef"
            )


@flax.struct.dataclass
class MPOState:
    """Everything an MPO update changes; checkpointing it restores the agent exactly.

    Attributes:
      params: {"policy", "critic", "dual"}; "dual" holds log eta and the log multipliers.
      target: {"policy", "critic"}, the target networks pi' and Q'.
      opt_state: one Adam state per group of params.
      steps: gradient steps taken (the target copy's clock).
    """

    params: dict
    target: dict
    opt_state: dict
    steps: jax.Array


def temperature_loss(q: jax.Array, log_prior: jax.Array, log_temperature: jax.Array,
                     epsilon: jax.Array) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """MPO's E-step: the temperature dual g(eta) and the non-parametric policy's weights (eq. 9).

    g(eta) = eta epsilon + eta E_s[log sum_i p_i exp(Q_i / eta)] with prior weights p_i:
    1 / N for N actions sampled from pi' (then it is rlax's `mpo_loss` temperature term), or
    pi'(a_i|s) when a categorical policy's actions are enumerated. Its minimizer over eta makes
    E_s[KL(q || pi')] = epsilon, with q_i = p_i exp(Q_i / eta) / Z the weights returned.

    Args:
      q: Q'(s, a_i), [N, B] (sample axis first).
      log_prior: log p_i, broadcastable to [N, B].
      log_temperature: log eta (gradients reach it through the dual).
      epsilon: the bound on E_s[KL(q || pi')].

    Returns:
      (g(eta), the weights q_i [N, B] with gradients stopped).
    """
    eta = jnp.exp(log_temperature)
    logits = q / eta + log_prior
    log_z = jax.scipy.special.logsumexp(logits, axis=0)
    loss = eta * epsilon + eta * jnp.mean(log_z)
    weights = jax.lax.stop_gradient(jnp.exp(logits - log_z))
    return loss, weights


def mpo(config: MPOConfig, observation_space: gym.Space, action_space: gym.Space) -> Agent:
    """Builds MPO's pure functions for one env's spaces.

    Args:
      config: hyperparameters; numeric fields may be traced.
      observation_space: single-env observation space.
      action_space: single-env action space.
    """
    discrete = networks.resolve_distribution(config.distribution, action_space) == "categorical"
    policy_net = networks.make_policy(
        action_space, config.hidden_sizes, config.activation, config.distribution, config.init_log_std
    )
    num_q = int(action_space.n) if discrete else 1
    critic = networks.MLP(tuple(config.hidden_sizes), config.activation, num_q, 1.0)
    if not discrete:
        low, high = jnp.asarray(action_space.low), jnp.asarray(action_space.high)
    # One multiplier per M-step bound (`kl.m_step_kls`): the categorical's KL, or the Gaussian's halves.
    multipliers = ("alpha",) if discrete else ("alpha_mean", "alpha_std")
    bounds = (config.epsilon_mean,) if discrete else (config.epsilon_mean, config.epsilon_std)
    clipped_opt, dual_opt = adam(config.max_grad_norm), adam()
    n_samples = config.num_action_samples

    def q_all(params, obs):
        """Q(s, .) [..., A] of a discrete critic."""
        return critic.apply(params, obs)

    def q_value(params, obs, action):
        """Q(s, a), broadcasting obs [..., O] against action [..., D] (or [...] discrete)."""
        if discrete:
            return jnp.take_along_axis(q_all(params, obs), action[..., None].astype(jnp.int32), axis=-1)[..., 0]
        # The env acts on the clipped action, so the critic sees that one.
        action = jnp.clip(action, low, high)
        obs = jnp.broadcast_to(obs, action.shape[:-1] + obs.shape[-1:])
        return critic.apply(params, jnp.concatenate([obs, action], axis=-1))[..., 0]

    def init(key: jax.Array) -> MPOState:
        policy_key, critic_key = jax.random.split(key)
        obs = jnp.zeros((1, *observation_space.shape), jnp.float32)
        critic_in = obs if discrete else jnp.concatenate([obs, jnp.zeros((1, *action_space.shape))], axis=-1)
        inits = (config.init_alpha_mean,) if discrete else (config.init_alpha_mean, config.init_alpha_std)
        dual = {"log_temperature": jnp.log(jnp.asarray(config.init_temperature, jnp.float32))}
        dual.update({f"log_{m}": jnp.log(jnp.asarray(v, jnp.float32)) for m, v in zip(multipliers, inits, strict=True)})
        params = {
            "policy": policy_net.init(policy_key, obs),
            "critic": critic.init(critic_key, critic_in),
            "dual": dual,
        }
        opt_state = {
            "policy": clipped_opt.init(params["policy"]),
            "critic": clipped_opt.init(params["critic"]),
            "dual": dual_opt.init(dual),
        }
        target = {"policy": params["policy"], "critic": params["critic"]}
        return MPOState(params=params, target=target, opt_state=opt_state, steps=jnp.zeros((), jnp.int32))

    policy, act = policy_and_act(policy_net)

    def value(state: MPOState, obs: jax.Array) -> jax.Array:
        # The collector's V(obs) is unused: MPO's critic is a Q, read from the buffer's windows.
        del state
        return jnp.zeros(obs.shape[:-1], jnp.float32)

    def improvement_samples(key, target_dist, q_params, obs):
        """(actions [N, B, ...], log prior [N, B], Q'(s, a) [N, B]) of the E-step at states obs [B]."""
        if discrete:
            actions = jnp.broadcast_to(jnp.arange(num_q)[:, None], (num_q, obs.shape[0]))
            return actions, target_dist.log_probs.T, q_all(q_params, obs).T
        mean, std = target_dist.mean, jnp.exp(target_dist.log_std)
        actions = mean + std * jax.random.normal(key, (n_samples, *mean.shape), mean.dtype)
        return actions, jnp.full((), -math.log(n_samples)), q_value(q_params, obs, actions)

    def expected_target_q(key, target, obs):
        """V'(s) = E_{a ~ pi'}[Q'(s, a)] at obs [B]."""
        target_dist = policy_net.apply(target["policy"], obs)
        _, log_prior, q = improvement_samples(key, target_dist, target["critic"], obs)
        return jnp.sum(jnp.exp(log_prior) * q, axis=0)

    def critic_targets(key, target, window):
        """(The critic's regression target y [B] for Q(s_0, a_0) of windows [B, n, ...], metrics)."""
        time_major = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), (window.reward, window.terminated, window.truncated))
        if config.critic_target == "n_step":
            partial, last, discount = n_step_targets(*time_major, config.gamma)
            boot_obs = jnp.take_along_axis(window.next_obs, last[:, None, None], axis=1)[:, 0]
            return partial + discount * expected_target_q(key, target, boot_obs), {}
        # Retrace: Q'(s_j, a_j), V'(s'_j) and pi'(a_j|s_j) at every step of the window. The buffer's
        # action is the behaviour's unclipped sample and log_prob its density, so the weights use
        # that sample; the critic sees it clipped, as the env did (`q_value`).
        batch, n = window.reward.shape
        q_t = q_value(target["critic"], window.obs, window.action)
        next_obs = window.next_obs.reshape((batch * n, *window.next_obs.shape[2:]))
        v_tp1 = expected_target_q(key, target, next_obs).reshape(batch, n)
        log_rho = policy_net.apply(target["policy"], window.obs).log_prob(window.action) - window.log_prob
        q_t, v_tp1, log_rho = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), (q_t, v_tp1, log_rho))
        q_ret = retrace_targets(q_t, v_tp1, *time_major, log_rho, config.gamma, config.retrace_lambda)
        # Over the window's steps (step 0's included, so a window of one step has one): the mean
        # truncated weight min(1, pi'/mu), 1 on-policy and falling as the replayed data go stale,
        # and the sample estimate E_mu[log mu - log pi'] of KL(mu || pi'), 0 on-policy.
        return q_ret[0], {"retrace_weight": jnp.mean(jnp.exp(jnp.minimum(log_rho, 0.0))),
                          "behaviour_kl": -jnp.mean(log_rho)}  # fmt: skip

    def loss_fn(params, target, batch):
        obs, action, y, actions, log_prior, q, target_dist = batch
        dual = params["dual"]
        critic_loss = 0.5 * jnp.mean(jnp.square(q_value(params["critic"], obs, action) - y))
        temp_loss, weights = temperature_loss(q, log_prior, dual["log_temperature"], config.epsilon)
        online = policy_net.apply(params["policy"], obs)
        aux = {}
        if discrete:
            policy_loss = -jnp.mean(jnp.sum(weights * online.log_probs.T, axis=0))
        else:
            # Decoupled M-step: the mean moves under pi''s std, the std under pi''s mean.
            fixed_std = DiagGaussian(online.mean, target_dist.log_std)
            fixed_mean = DiagGaussian(target_dist.mean, online.log_std)
            policy_loss = -jnp.mean(jnp.sum(weights * (fixed_std.log_prob(actions) + fixed_mean.log_prob(actions)), 0))
        # The M-step's bounds: a categorical's KL(pi' || pi), or a Gaussian's mean and std halves.
        kls = kl.m_step_kls(target_dist, online)
        alpha_loss = sum(kl.kl_constraint_loss(jnp.exp(dual[f"log_{m}"]), d, e)
                         for m, d, e in zip(multipliers, kls, bounds, strict=True))  # fmt: skip
        aux.update({m: jnp.exp(dual[f"log_{m}"]) for m in multipliers})
        if not discrete:
            aux.update(kl_mean=jnp.mean(kls[0]), kl_std=jnp.mean(kls[1]))
        kl_all = kl.kl_old_new(target_dist, online)
        loss = critic_loss + policy_loss + alpha_loss + temp_loss
        # KL(q || pi') of the E-step's weights against their prior, which the temperature holds at epsilon.
        e_step_kl = jnp.mean(jnp.sum(weights * (jnp.log(jnp.maximum(weights, 1e-30)) - log_prior), axis=0))
        aux.update(critic_loss=critic_loss, policy_loss=policy_loss, temperature_loss=temp_loss,
                   temperature=jnp.exp(dual["log_temperature"]), kl=jnp.mean(kl_all), e_step_kl=e_step_kl,
                   q_mean=jnp.mean(q), entropy=jnp.mean(online.entropy()))  # fmt: skip
        return loss, aux

    def grad_step(replay, carry, key):
        params, target, opt_state, steps = carry
        sample_key, boot_key, e_key = jax.random.split(key, 3)
        window = buffer.sample_windows(sample_key, replay, config.batch_size, config.n_step)
        y, target_metrics = critic_targets(boot_key, target, window)
        obs = window.obs[:, 0]
        target_dist = policy_net.apply(target["policy"], obs)
        actions, log_prior, q = improvement_samples(e_key, target_dist, target["critic"], obs)
        batch = (obs, window.action[:, 0], y, actions, log_prior, q, target_dist)
        grads, aux = jax.grad(loss_fn, has_aux=True)(params, target, batch)
        aux = {**aux, **target_metrics}
        lrs = {"policy": config.lr, "critic": config.critic_lr, "dual": config.dual_lr}
        new_params, new_opt = {}, {}
        for group, opt in (("policy", clipped_opt), ("critic", clipped_opt), ("dual", dual_opt)):
            updates, new_opt[group] = opt.update(grads[group], opt_state[group], params[group])
            new_params[group] = apply_step(params[group], updates, lrs[group])
        new_params["dual"] = jax.tree.map(lambda x: jnp.maximum(x, _MIN_LOG_DUAL), new_params["dual"])
        steps = steps + 1
        copy = steps % config.target_period == 0
        target = jax.tree.map(lambda t, p: jnp.where(copy, p, t), target,
                              {"policy": new_params["policy"], "critic": new_params["critic"]})  # fmt: skip
        return (new_params, target, new_opt, steps), aux

    def update(key: jax.Array, state: MPOState, replay: buffer.BufferState, ctx: UpdateContext):
        del ctx
        num_envs = jax.tree.leaves(replay.data)[0].shape[1]
        ready = (replay.size * num_envs >= config.learning_starts) & (replay.size >= config.n_step)
        carry = (state.params, state.target, state.opt_state, state.steps)
        new_carry, aux = jax.lax.scan(lambda c, k: grad_step(replay, c, k), carry,
                                      jax.random.split(key, config.grad_steps))  # fmt: skip
        # Before learning_starts the update leaves the agent as it was (its metrics are computed
        # on the data there is, and logged, but nothing moves).
        params, target, opt_state, steps = jax.tree.map(lambda n, o: jnp.where(ready, n, o), new_carry, carry)
        metrics = {k: jnp.mean(v) for k, v in aux.items()}
        metrics.update(grad_steps=jnp.where(ready, config.grad_steps, 0).astype(jnp.float32),
                       replay_size=(replay.size * num_envs).astype(jnp.float32))  # fmt: skip
        return MPOState(params=params, target=target, opt_state=opt_state, steps=steps), metrics

    return Agent(init=init, act=act, value=value, policy=policy, update=update)
