"""Advantage-Weighted Regression (Peng, Kumar, Zhang and Levine 2019, arXiv:1910.00177).

Off-policy through the loop's replay (`RolloutSpec.replay_capacity`): each update adds a rollout
to a buffer of the most recent `buffer_size` transitions, then fits the critic and the policy on
the whole buffer by supervised regression (Algorithm 1):

1. Critic: V regresses on the TD(lambda) returns of the buffer's trajectories, computed with
   the current V before the critic's `critic_steps` minibatch steps (`kl_rl.returns.gae`: a
   terminated step does not bootstrap, a truncated one does, from V of its true next
   observation, and the newest step of each env bootstraps too).
2. Policy: max E_{s,a ~ D}[log pi(a|s) exp(A(s, a) / beta)], `actor_steps` minibatch steps,
   with A = R^lambda - V from the refitted critic, normalized over the buffer (the authors'
   code; `normalize_advantages`) and each weight clipped at `max_weight`.

Where KL enters: the weighted regression is the closed-form solution, projected onto the
policy class, of max_pi E[A] subject to E_s[KL(pi || mu)] <= epsilon, where mu is the behaviour
policy that filled the buffer (the paper's eq. 5-8): pi*(a|s) proportional to
mu(a|s) exp(A(s, a) / beta), beta being the constraint's multiplier. So the anchor is the
behaviour policy of stale data, and beta is the leash: a larger beta flattens the weights
towards behaviour cloning of the buffer, a smaller one moves further from it. The update logs
both KLs it moves: `behaviour_kl`, E_D[KL(mu || pi)] to the recorded behaviour distributions,
and `kl`, E_D[KL(pi_old || pi)] to the policy at the update's start (what the other agents
log as `kl`), with the weights' statistics (`weight_mean`, `weight_max`, `clipped_fraction`).

Differences from the authors' code (xbpeng/awr): Adam instead of SGD with momentum, a learned
state-independent log std for Gaussian policies instead of a fixed 0.2, no action-bound loss
(the env clips actions), and gradient steps per update fixed instead of scaled by the samples
collected (every update collects the same num_envs x num_steps).
"""

import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp

from kl_rl import buffer, kl
from kl_rl.agents.base import Agent, RolloutSpec, UpdateContext
from kl_rl.agents.common import OnPolicyConfig, actor_critic, adam, apply_step, check_positive, replay_rollout
from kl_rl.config import static
from kl_rl.errors import ConfigError
from kl_rl.returns import gae


@flax.struct.dataclass
class AWRConfig(OnPolicyConfig):
    """AWR hyperparameters: the authors' temperature 1 on normalized advantages, weight clip 20
    and lambda 0.95; a 50,000-transition buffer; minibatches of 256. The beta and lambda fields
    are traced: a sweep over the leash compiles one program."""

    total_steps: int = static(200_000)
    """Env steps to train for, summed over the parallel envs."""
    num_envs: int = static(8)
    """Parallel environments collected in lockstep."""
    num_steps: int = static(128)
    """Steps per env per rollout; each update adds num_envs x num_steps transitions."""
    buffer_size: int = static(50_000)
    """Transitions the replay buffer holds (the oldest are overwritten); the paper's 50k."""
    batch_size: int = static(256)
    """Transitions per minibatch, drawn uniformly from the buffer."""
    critic_steps: int = static(100)
    """Critic minibatch steps per update."""
    actor_steps: int = static(250)
    """Policy minibatch steps per update."""
    lr: float = 3e-4
    """Adam learning rate of the policy."""
    critic_lr: float = 1e-3
    """Adam learning rate of the critic."""
    max_grad_norm: float = 0.5
    """Gradient-norm clip of the policy's and of the critic's gradients, each on its own."""
    beta: float = 1.0
    """The temperature of exp(A / beta): the KL constraint's multiplier, the leash (on normalized
    advantages when normalize_advantages is on)."""
    max_weight: float = 20.0
    """Clip of each weight exp(A / beta) (the paper's 20)."""

    @property
    def rollout(self) -> RolloutSpec:
        """Rollouts of num_envs x num_steps added to a replay of buffer_size transitions."""
        return replay_rollout(self)

    def validate(self, action_space: gym.Space) -> None:
        """Raises ConfigError on values no run could use."""
        self._check_on_policy(action_space, ("buffer_size", "batch_size", "critic_steps", "actor_steps"))
        check_positive(self, (), ("lr", "critic_lr", "max_grad_norm", "beta", "max_weight"))
        if self.buffer_size // self.num_envs < self.num_steps:
            raise ConfigError(
                f"{{buffer_size}} {self.buffer_size} holds less than one rollout ({self.batch_size_per_update} "
                f"transitions); raise it to at least {self.batch_size_per_update}",
                "buffer_size",
            )
        if self.normalize_reward:
            raise ConfigError(
                "awr replays rewards over many updates, so {normalize_reward} (a running scale) is not "
                "supported; leave it off",
                "normalize_reward",
            )
        if self.ref_kl_coef != 0.0 or self.uses_reference_options():
            raise ConfigError(
                "awr takes no frozen reference penalty; leave the {ref_kl_coef} options unset", "ref_kl_coef"
            )

    @property
    def batch_size_per_update(self) -> int:
        """Transitions one update collects."""
        return self.num_envs * self.num_steps

    @property
    def grad_steps(self) -> int:
        """Gradient steps per update: the critic's and then the policy's minibatch steps."""
        return self.critic_steps + self.actor_steps

    @property
    def num_updates(self) -> int:
        return self.total_steps // self.batch_size_per_update


@flax.struct.dataclass
class AWRState:
    """Network parameters and their Adam states: a checkpoint restores AWR exactly."""

    params: dict
    opt_state: dict


def awr_weights(advantages: jax.Array, valid: jax.Array, beta, max_weight, normalize: bool):
    """(exp(A / beta) clipped at max_weight, the normalized A), statistics over the valid entries only.

    Args:
      advantages: A, any shape.
      valid: bool mask of the entries that hold data (same shape).
      beta: the temperature.
      max_weight: the clip.
      normalize: divide (A - mean) by its std first, both over the valid entries.
    """
    if normalize:
        count = jnp.maximum(jnp.sum(valid), 1)
        mean = jnp.sum(jnp.where(valid, advantages, 0.0)) / count
        var = jnp.sum(jnp.where(valid, jnp.square(advantages - mean), 0.0)) / count
        advantages = (advantages - mean) / (jnp.sqrt(var) + 1e-5)
    # exp of the clip's log: no overflow to inf before the clip for very large A / beta.
    weights = jnp.exp(jnp.minimum(advantages / beta, jnp.log(max_weight)))
    return jnp.where(valid, weights, 0.0), advantages


def awr(config: AWRConfig, observation_space: gym.Space, action_space: gym.Space) -> Agent:
    """Builds AWR's pure functions for one env's spaces.

    Args:
      config: hyperparameters; numeric fields may be traced.
      observation_space: single-env observation space.
      action_space: single-env action space.
    """
    ac = actor_critic(config, observation_space, action_space)
    policy_net, value_net = ac.policy_net, ac.value_net
    optimizer = adam(config.max_grad_norm)

    def init(key: jax.Array) -> AWRState:
        params = ac.init_params(key)
        opt_state = {"policy": optimizer.init(params["policy"]), "value": optimizer.init(params["value"])}
        return AWRState(params=params, opt_state=opt_state)

    def lambda_returns(value_params, data, valid):
        """TD(lambda) returns and advantages of every buffered transition, [C, N]."""
        v = value_net.apply(value_params, data.obs)
        v_next = value_net.apply(value_params, data.next_obs)
        advantages, returns = gae(data.reward, v, v_next, data.terminated, data.truncated, config.gamma,
                                  config.gae_lambda)  # fmt: skip
        return jnp.where(valid, advantages, 0.0), returns, v

    def minibatch_indices(key, size, capacity, num_envs, steps):
        """[steps, batch] indices into the flattened [capacity x num_envs] buffer, drawn uniformly
        from the valid transitions (the last `size` rows, oldest first)."""
        first = (capacity - size) * num_envs
        return first + jax.random.randint(key, (steps, config.batch_size), 0, jnp.maximum(size * num_envs, 1))

    def fit(params, opt_state, loss, lr, idx, data):
        """`len(idx)` Adam steps of loss(params, minibatch) over the minibatches data[idx[i]]."""

        def step(carry, i):
            params, opt_state = carry
            minibatch = jax.tree.map(lambda x: x[i], data)
            value, grads = jax.value_and_grad(loss)(params, minibatch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (apply_step(params, updates, lr), opt_state), value

        return jax.lax.scan(step, (params, opt_state), idx)

    def update(key: jax.Array, state: AWRState, replay: buffer.BufferState, ctx: UpdateContext):
        del ctx
        critic_key, actor_key = jax.random.split(key)
        data = buffer.ordered(replay)  # oldest first; the valid items are the last `size` rows
        capacity, num_envs = data.reward.shape
        valid = jnp.broadcast_to((jnp.arange(capacity) >= capacity - replay.size)[:, None], (capacity, num_envs))
        flat = lambda x: x.reshape(capacity * num_envs, *x.shape[2:])  # noqa: E731

        # 1. The critic regresses on the TD(lambda) returns of the current V.
        _, returns, v_before = lambda_returns(state.params["value"], data, valid)
        targets = (flat(data.obs), flat(returns))
        idx = minibatch_indices(critic_key, replay.size, capacity, num_envs, config.critic_steps)

        def critic_loss(p, batch):
            obs, target = batch
            return 0.5 * jnp.mean(jnp.square(value_net.apply(p, obs) - target))

        (value_params, value_opt), critic_losses = fit(state.params["value"], state.opt_state["value"], critic_loss,
                                                       config.critic_lr, idx, targets)  # fmt: skip

        # 2. The policy regresses on the buffer's actions, weighted by exp(A / beta) of the refitted critic.
        advantages, new_returns, v_after = lambda_returns(value_params, data, valid)
        weights, _ = awr_weights(advantages, valid, config.beta, config.max_weight, config.normalize_advantages)
        idx = minibatch_indices(actor_key, replay.size, capacity, num_envs, config.actor_steps)

        def policy_loss(p, batch):
            obs, action, w = batch
            return -jnp.mean(w * policy_net.apply(p, obs).log_prob(action))

        (policy_params, policy_opt), policy_losses = fit(
            state.params["policy"], state.opt_state["policy"], policy_loss, config.lr, idx,
            (flat(data.obs), flat(data.action), flat(weights)),
        )  # fmt: skip

        params = {"policy": policy_params, "value": value_params}
        count = jnp.maximum(jnp.sum(valid), 1)
        mean_valid = lambda x: jnp.sum(jnp.where(valid, x, 0.0)) / count  # noqa: E731
        var_valid = lambda x: mean_valid(jnp.square(x - mean_valid(x)))  # noqa: E731
        old_dist = policy_net.apply(state.params["policy"], data.obs)
        new_dist = policy_net.apply(policy_params, data.obs)
        metrics = {
            "policy_loss": jnp.mean(policy_losses),
            "vf_loss": jnp.mean(critic_losses),
            "kl": mean_valid(kl.kl_old_new(old_dist, new_dist)),
            "behaviour_kl": mean_valid(kl.kl_old_new(data.dist, new_dist)),
            "weight_mean": mean_valid(weights),
            "weight_max": jnp.max(weights),
            "clipped_fraction": mean_valid((weights >= config.max_weight * (1 - 1e-6)).astype(jnp.float32)),
            "entropy": mean_valid(new_dist.entropy()),
            "explained_variance": 1.0 - var_valid(new_returns - v_after) / (var_valid(new_returns) + 1e-8),
            "critic_change": mean_valid(jnp.abs(v_after - v_before)),
            "replay_size": (replay.size * num_envs).astype(jnp.float32),
        }
        opt_state = {"policy": policy_opt, "value": value_opt}
        return AWRState(params=params, opt_state=opt_state), metrics

    return Agent(init=init, act=ac.act, value=ac.value, policy=ac.policy, update=update)
