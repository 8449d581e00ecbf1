"""One vectorization layer for any FuncEnv: vmap, time limit and autoreset, written once.

gymnasium's own `FunctionalJaxVectorEnv.step` freezes every sub-env on a step where any one of
them resets; here each env resets independently with `jnp.where`. Termination (a terminal MDP
state: never bootstrap) and truncation (the time limit: bootstrap from `final_obs`) stay
distinct, and the true next observation of every transition is returned beside the reset one.
"""

from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class VecEnvState:
    """The state of N envs.

    Attributes:
      env_state: the FuncEnv states, leading axis N.
      obs: [N, ...] observation to act on (already the reset one where an episode ended).
      time: [N] steps taken in the current episode.
      episode_return: [N] undiscounted return so far of the current episode.
      episode_length: [N] length so far of the current episode.
    """

    env_state: Any
    obs: jax.Array
    time: jax.Array
    episode_return: jax.Array
    episode_length: jax.Array


class StepOut(NamedTuple):
    """What one step of N envs returns.

    Attributes:
      obs: [N, ...] next observation to act on (the reset observation where done).
      reward: [N] float32.
      terminated: [N] bool, a terminal state of the MDP was reached.
      truncated: [N] bool, the time limit was hit and the state is not terminal.
      final_obs: [N, ...] the true next observation of this transition, before any reset.
      episode_return: [N] return of the episode that ended at this step (0 where not done).
      episode_length: [N] its length (0 where not done).
    """

    obs: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    final_obs: jax.Array
    episode_return: jax.Array
    episode_length: jax.Array


class VecEnv:
    """N copies of a FuncEnv stepped in lockstep under vmap, with autoreset and a time limit.

    Args:
      env: any FuncEnv (kl_rl's ports, gymnasium's phys2d envs, your own).
      num_envs: N.
      max_episode_steps: time limit; None takes `env.max_episode_steps` if the env has one,
        and otherwise there is no time limit.
      params: env params; None takes `env.default_params`.
    """

    def __init__(self, env: Any, num_envs: int, max_episode_steps: int | None = None, params: Any = None):
        self.env = env
        self.num_envs = int(num_envs)
        self.max_episode_steps = (
            max_episode_steps if max_episode_steps is not None else getattr(env, "max_episode_steps", None)
        )
        self.params = params if params is not None else getattr(env, "default_params", None)
        self.observation_space = env.observation_space
        self.action_space = env.action_space

    def _reset_one(self, init_key: jax.Array, obs_key: jax.Array) -> tuple[Any, jax.Array]:
        state = self.env.initial(init_key, self.params)
        return state, jnp.asarray(self.env.observation(state, obs_key, self.params), jnp.float32)

    def reset(self, key: jax.Array) -> VecEnvState:
        """Fresh episodes in all N envs."""
        keys = jax.random.split(key, (self.num_envs, 2))
        state, obs = jax.vmap(self._reset_one)(keys[:, 0], keys[:, 1])
        zeros = jnp.zeros(self.num_envs, jnp.int32)
        return VecEnvState(state, obs, zeros, jnp.zeros(self.num_envs, jnp.float32), zeros)

    def _step_one(self, keys: jax.Array, state: Any, action: jax.Array):
        transition_key, reward_key, terminal_key, obs_key, init_key, reset_obs_key = keys
        next_state = self.env.transition(state, action, transition_key, self.params)
        reward = self.env.reward(state, action, next_state, reward_key, self.params)
        terminated = self.env.terminal(next_state, terminal_key, self.params)
        obs = self.env.observation(next_state, obs_key, self.params)
        reset_state, reset_obs = self._reset_one(init_key, reset_obs_key)
        return (
            next_state,
            jnp.asarray(obs, jnp.float32),
            jnp.asarray(reward, jnp.float32),
            jnp.asarray(terminated, bool),
            reset_state,
            reset_obs,
        )

    def step(self, key: jax.Array, state: VecEnvState, action: jax.Array) -> tuple[VecEnvState, StepOut]:
        """Steps all N envs with `action` [N, ...]; envs whose episode ends are reset."""
        # One PRNG call for every key of the step: this runs once per scan iteration, where each
        # extra hash is a measurable share of a small env's step time.
        keys = jax.random.split(key, (self.num_envs, 6))
        next_state, final_obs, reward, terminated, reset_state, reset_obs = jax.vmap(self._step_one)(
            keys, state.env_state, action
        )
        time = state.time + 1
        if self.max_episode_steps is None:
            truncated = jnp.zeros_like(terminated)
        else:
            truncated = (time >= self.max_episode_steps) & ~terminated
        done = terminated | truncated
        episode_return = state.episode_return + reward
        episode_length = state.episode_length + 1

        def select(reset, keep):
            mask = done.reshape(done.shape + (1,) * (keep.ndim - 1))
            return jnp.where(mask, reset, keep)

        new_state = VecEnvState(
            env_state=jax.tree.map(select, reset_state, next_state),
            obs=select(reset_obs, final_obs),
            time=jnp.where(done, 0, time),
            episode_return=jnp.where(done, 0.0, episode_return),
            episode_length=jnp.where(done, 0, episode_length),
        )
        out = StepOut(
            obs=new_state.obs,
            reward=reward,
            terminated=terminated,
            truncated=truncated,
            final_obs=final_obs,
            episode_return=jnp.where(done, episode_return, 0.0),
            episode_length=jnp.where(done, episode_length, 0),
        )
        return new_state, out
