"""The one collector: `lax.scan` of a policy over a vectorized env.

Every algorithm collects experience through `collect`. It records, for each step, the
observation the policy acted on, the behaviour policy's distribution and log-prob, and the true
next observation (before autoreset), so returns can bootstrap on truncation and updates can
measure KL to the policy that collected the data.

A policy may carry a state from step to step (a recurrent cell): the collector threads it
through the rollout in `CollectorState.policy`, resets it per env where an episode ends (the
terminated | truncated signal the buffer records), and records the state each step acted with
and whether that step started an episode, from which an update recomputes the same
distributions (`kl_rl.networks.unroll`). A stateless policy carries None, and every branch on it
is static: its program is the one it was before the carried state existed.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import gymnasium as gym
import jax
import jax.numpy as jnp

from kl_rl import buffer, networks, normalize
from kl_rl.buffer import Transition
from kl_rl.envs.vector import VecEnv, VecEnvState

# act(key, obs) -> (action, log_prob, dist), batched over the env axis; a stateful policy's is
# act(key, obs, policy_state) -> (action, log_prob, dist, policy_state).
ActFn = Callable[..., tuple]
# value(obs) -> V(obs), batched over any leading axes; for a stateful policy whose states are
# kept, value(obs, policy_state) (the state the policy acted with on obs).
ValueFn = Callable[..., jax.Array]


class EpisodeStats(NamedTuple):
    """Sums over the episodes that ended during one rollout."""

    return_sum: jax.Array
    length_sum: jax.Array
    count: jax.Array


class PolicyCarry(NamedTuple):
    """A stateful policy's state between steps.

    Attributes:
      state: the state the policy acts with at the next step, leaves [N, ...].
      start: [N] bool, the next step's observation is the first of an episode.
    """

    state: Any
    start: jax.Array


class CollectorState(NamedTuple):
    """What the collector carries from one rollout to the next.

    Attributes:
      env: the vectorized env's state.
      obs_norm: running moments of the raw observations.
      reward_norm: running moments of each env's discounted return, whose std scales rewards.
      discounted_return: [N] each env's discounted return so far in its current episode.
      policy: a stateful policy's `PolicyCarry`; None (no leaves) for a stateless policy.
      reference: a stateful frozen reference's state (leaves [N, ...]), the one it scores the
        next step with; reset where the policy's is. None for a stateless reference or none.
    """

    env: VecEnvState
    obs_norm: normalize.RunningMeanStd
    reward_norm: normalize.RunningMeanStd
    discounted_return: jax.Array
    policy: PolicyCarry | None = None
    reference: Any = None


def init_collector(
    env: VecEnvState, obs_shape: tuple[int, ...], initial_state: Any = None, reference_state: Any = None
) -> CollectorState:
    """A collector over `env` whose normalizers have seen nothing yet; with a stateful policy's
    `initial_state` (leaves [N, ...]), every env starts an episode with it, and likewise with a
    stateful reference's `reference_state`."""
    policy = None if initial_state is None else fresh_policy(initial_state)
    return CollectorState(env, normalize.init(obs_shape), normalize.init(()), jnp.zeros_like(env.episode_return),
                          policy, reference_state)  # fmt: skip


def fresh_policy(initial_state: Any) -> PolicyCarry:
    """The carry of a stateful policy whose every env starts a new episode."""
    num_envs = jax.tree.leaves(initial_state)[0].shape[0]
    return PolicyCarry(initial_state, jnp.ones(num_envs, bool))


def scale_reward(
    reward_norm: normalize.RunningMeanStd,
    discounted_return: jax.Array,
    reward: jax.Array,
    done: jax.Array,
    gamma: jax.Array,
) -> tuple[normalize.RunningMeanStd, jax.Array, jax.Array]:
    """Reward scaling by the std of the discounted return (gymnasium's NormalizeReward, SB3's VecNormalize).

    Each env's discounted return R <- gamma R + r is merged into the running moments, and the
    reward is divided by their std (not centred, which would change the optimal policy) and
    clipped to [-10, 10]. R restarts where an episode ended, on termination or truncation.

    Returns:
      The new moments, the new discounted returns, and the scaled rewards.
    """
    discounted_return = discounted_return * gamma + reward
    reward_norm = normalize.update(reward_norm, discounted_return)
    scaled = jnp.clip(reward / jnp.sqrt(reward_norm.var + 1e-8), -10.0, 10.0)
    return reward_norm, jnp.where(done, 0.0, discounted_return), scaled


def env_action(action_space: gym.Space, action: jax.Array) -> jax.Array:
    """The action the env receives: Gaussian samples are clipped to a Box's bounds.

    The unclipped sample is what the buffer stores, so log-probs and KL stay those of the policy.
    """
    if isinstance(action_space, gym.spaces.Box):
        return jnp.clip(action, jnp.asarray(action_space.low), jnp.asarray(action_space.high))
    return action


def observe(obs_norm: normalize.RunningMeanStd, obs: jax.Array, enabled: bool) -> jax.Array:
    """The observation the policy sees: normalized with the running moments when enabled."""
    return normalize.normalize(obs_norm, obs) if enabled else obs


def collect(
    key: jax.Array,
    act: ActFn,
    vec_env: VecEnv,
    state: CollectorState,
    num_steps: int,
    normalize_obs: bool,
    value: ValueFn | None = None,
    reward_gamma: jax.Array | None = None,
    reference: Callable[[jax.Array], Any] | None = None,
    reward_penalty: Callable[[Any, jax.Array, Any], jax.Array] | None = None,
    first_episode_only: bool = False,
    initial_state: Any = None,
    keep_state: bool = True,
    reference_initial_state: Any = None,
) -> tuple[CollectorState, Transition, EpisodeStats]:
    """Runs `act` for `num_steps` steps of every env in `vec_env`.

    Args:
      key: PRNG key.
      act: the behaviour policy, batched over envs.
      vec_env: the vectorized env.
      state: env state and observation-normalizer state.
      num_steps: T, the rollout length (static).
      normalize_obs: whether to normalize observations with running moments (static). The
        moments are updated with each step's raw observations before the policy sees them.
      value: the behaviour critic, or None (values are then 0). It is applied to all [T, N]
        observations in one batched call after the loop: the parameters are the same at every
        step, so the values are the ones a per-step call would give, at a fraction of the
        per-step work in the loop. With a stateful policy's states kept, it is given them too,
        value(obs, policy_state), for a critic that reads them.
      reward_gamma: None stores raw rewards; a discount stores rewards scaled by the running
        std of the discounted return (`scale_reward`). Episode returns stay unscaled.
      reference: reference(raw_obs) -> the distribution of a frozen reference policy, which
        applies its own observation normalizer; recorded as each transition's `ref_dist`. A
        stateful reference (`state.reference` not None) is reference(raw_obs, ref_state) ->
        (distribution, ref_state), and its state is carried and reset as the policy's is.
      reward_penalty: reward_penalty(dist, action, ref_dist) -> [N], subtracted from the raw
        reward before any scaling (a KL penalty in the reward, as in RLHF). Needs `reference`.
      first_episode_only: count only each env's first episode of the rollout in the episode
        statistics (an episodic agent's rollout starts from reset envs and learns from those).
        A stateful policy's state is then not reset where an episode ends (as in `evaluate`):
        the steps after an env's first episode act with a state carried over from it, and
        their distributions and actions are filler that nothing reads. A KV cache so prefills
        once per rollout instead of at every new prompt.
      initial_state: a stateful policy's initial state (leaves [N, ...]), which an env's state
        is reset to where its episode ends; needed when `state.policy` is not None.
      keep_state: store each step's policy state in the trajectory (static); False where the
        update reads none (a token policy's KV cache: the update scores whole responses). The
        `start` flags are stored either way.
      reference_initial_state: a stateful reference's initial state (leaves [N, ...]), which an
        env's reference state is reset to where its episode ends; needed when
        `state.reference` is not None.

    Returns:
      The new collector state, the trajectory as a `Transition` with leaves [T, N, ...], and the
      sums over episodes that ended during the rollout.
    """

    def step(carry: CollectorState, keys: jax.Array):
        env_state, obs_norm, reward_norm, discounted_return, policy, ref_state = carry
        if normalize_obs:
            obs_norm = normalize.update(obs_norm, env_state.obs)
        obs = observe(obs_norm, env_state.obs, normalize_obs)
        act_key, env_key = keys
        if policy is None:
            action, log_prob, dist = act(act_key, obs)
        else:
            action, log_prob, dist, policy_state = act(act_key, obs, policy.state)
        ref_dist = None
        if ref_state is not None:
            ref_dist, ref_state = reference(env_state.obs, ref_state)
        elif reference is not None:
            ref_dist = reference(env_state.obs)
        env_state, out = vec_env.step(env_key, env_state, env_action(vec_env.action_space, action))
        reward = out.reward
        if reward_penalty is not None:
            reward = reward - reward_penalty(dist, action, ref_dist)
        if reward_gamma is not None:
            reward_norm, discounted_return, reward = scale_reward(
                reward_norm, discounted_return, reward, out.terminated | out.truncated, reward_gamma
            )
        transition = Transition(
            obs=obs,
            action=action,
            reward=reward,
            terminated=out.terminated,
            truncated=out.truncated,
            next_obs=observe(obs_norm, out.final_obs, normalize_obs),
            value=jnp.zeros(out.reward.shape, jnp.float32),
            log_prob=log_prob,
            dist=dist,
            ref_dist=ref_dist,
        )
        done = out.terminated | out.truncated
        if policy is not None:
            transition = transition._replace(
                policy_state=policy.state if keep_state else None,
                start=policy.start,
                next_policy_state=policy_state if keep_state else None,
            )
            if first_episode_only:
                # An episodic rollout keeps a policy's state where an env's first episode ends:
                # the steps after it are not learned from or counted, as in `evaluate`.
                policy = PolicyCarry(policy_state, jnp.zeros_like(done))
            else:
                policy = PolicyCarry(networks.reset_state(policy_state, initial_state, done), done)
        if ref_state is not None:
            ref_state = networks.reset_state(ref_state, reference_initial_state, done)
        carry = CollectorState(env_state, obs_norm, reward_norm, discounted_return, policy, ref_state)
        return carry, (transition, out.episode_return, out.episode_length)

    # Keys for all steps in one PRNG call, and episode sums over [T, N] after the loop: both
    # keep work out of the loop body, which runs once per env step.
    state, (trajectory, returns, lengths) = jax.lax.scan(step, state, jax.random.split(key, (num_steps, 2)))
    if value is not None:
        with_state = () if trajectory.policy_state is None else (trajectory.policy_state,)
        trajectory = trajectory._replace(value=value(trajectory.obs, *with_state))
    done = trajectory.terminated | trajectory.truncated
    if first_episode_only:
        done = done & buffer.in_first_episode(trajectory)
    stats = EpisodeStats(
        return_sum=jnp.sum(jnp.where(done, returns, 0.0)),
        length_sum=jnp.sum(jnp.where(done, lengths, 0)).astype(jnp.float32),
        count=jnp.sum(done).astype(jnp.float32),
    )
    return state, trajectory, stats


class Recording(NamedTuple):
    """What `record` keeps of every step of an evaluation, leaves [T, N, ...].

    Attributes:
      state: the envs' state the policy acted on at step t (`VecEnvState`; a host env's
        `env_state` is each copy's index, its own state lives on the host).
      action: the action the env received at step t.
      running: step t belongs to its env's first episode (the one whose return counts).
    """

    state: VecEnvState
    action: jax.Array
    running: jax.Array


def evaluate(
    key: jax.Array,
    policy: Callable[[jax.Array, jax.Array], jax.Array],
    vec_env: VecEnv,
    obs_norm: normalize.RunningMeanStd,
    normalize_obs: bool,
    max_steps: int,
    batch_like: Any = (),
    initial_state: Any = None,
) -> jax.Array:
    """Undiscounted return of one episode in each of `vec_env`'s envs.

    Args:
      key: PRNG key.
      policy: policy(key, obs) -> action, batched over envs (e.g. the distribution's mode).
      vec_env: one env per evaluation episode.
      obs_norm: frozen observation-normalizer moments.
      normalize_obs: whether the policy expects normalized observations (static).
      max_steps: steps to run; at least the env's time limit, so every episode ends (static).
      batch_like: passed to `vec_env.reset` (a host env makes copies for every axis it is
        batched along; the training env's state is).
      initial_state: a stateful policy's initial state (leaves [N, ...]); `policy` is then
        policy(key, obs, policy_state) -> (action, policy_state). Only each env's first
        episode counts, so the state is never reset.

    Returns:
      [N] returns, each of the first episode of its env.
    """
    total, _ = _first_episodes(key, policy, vec_env, obs_norm, normalize_obs, max_steps, batch_like, False,
                               initial_state)  # fmt: skip
    return total


def record(
    key: jax.Array,
    policy: Callable[[jax.Array, jax.Array], jax.Array],
    vec_env: VecEnv,
    obs_norm: normalize.RunningMeanStd,
    normalize_obs: bool,
    max_steps: int,
    batch_like: Any = (),
    initial_state: Any = None,
) -> tuple[jax.Array, Recording]:
    """`evaluate`, also keeping every step's env state and action: what a video of the episodes
    is drawn from (`kl_rl.video`). The same steps from the same key, so the same returns.

    Returns:
      [N] returns of each env's first episode, and the `Recording` of the max_steps steps.
    """
    return _first_episodes(key, policy, vec_env, obs_norm, normalize_obs, max_steps, batch_like, True, initial_state)


def _first_episodes(key, policy, vec_env, obs_norm, normalize_obs, max_steps, batch_like, keep, initial_state):
    """The one evaluation loop of `evaluate` and `record`; `keep` (static) stacks a `Recording`;
    a stateful policy (`initial_state` not None) carries its state, never reset (first episodes only)."""
    reset_key, run_key = jax.random.split(key)
    env_state = vec_env.reset(reset_key, batch_like)

    def step(carry, step_key):
        env_state, total, running, policy_state = carry
        act_key, env_key = jax.random.split(step_key)
        obs = observe(obs_norm, env_state.obs, normalize_obs)
        if policy_state is None:
            action = policy(act_key, obs)
        else:
            action, policy_state = policy(act_key, obs, policy_state)
        action = env_action(vec_env.action_space, action)
        next_state, out = vec_env.step(env_key, env_state, action)
        total = total + jnp.where(running, out.reward, 0.0)
        kept = Recording(env_state, action, running) if keep else None
        running = running & ~(out.terminated | out.truncated)
        return (next_state, total, running, policy_state), kept

    init = (env_state, jnp.zeros(vec_env.num_envs), jnp.ones(vec_env.num_envs, bool), initial_state)
    (_, total, _, _), recording = jax.lax.scan(step, init, jax.random.split(run_key, max_steps))
    return total, recording
