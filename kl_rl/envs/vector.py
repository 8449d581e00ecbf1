"""One vectorization layer for any FuncEnv: vmap, time limit and autoreset, written once.

gymnasium's own `FunctionalJaxVectorEnv.step` freezes every sub-env on a step where any one of
them resets; here each env resets independently with `jnp.where`. Termination (a terminal MDP
state: never bootstrap) and truncation (the time limit: bootstrap from `final_obs`) stay
distinct, and the true next observation of every transition is returned beside the reset one.

Two shapes of env are vectorized here: a gymnasium `FuncEnv` (kl_rl's ports, the token tasks),
and a `StepEnv`, an env given as a pure `reset` and `step` (the adapters of the JAX-native
families in `kl_rl.envs.families`: gymnax, Brax, navix). Both share the autoreset, the time limit and
the episode bookkeeping (`advance`).
"""

import contextlib
import dataclasses
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from gymnasium.experimental.functional import FuncEnv


@flax.struct.dataclass
class VecEnvState:
    """The state of N envs.

    Attributes:
      env_state: the FuncEnv states, leading axis N.
      obs: [N, ...] float32 observation to act on (already the reset one where an episode ended).
      time: [N] int32 steps taken in the current episode; the time limit reads it.
      episode_return: [N] float32 undiscounted return so far of the current episode.
      episode_length: [N] int32 length so far of the current episode.
    """

    env_state: Any
    obs: jax.Array
    time: jax.Array
    episode_return: jax.Array
    episode_length: jax.Array


class StepOut(NamedTuple):
    """What one step of N envs returns.

    Attributes:
      obs: [N, ...] float32 next observation to act on (the reset observation where done).
      reward: [N] float32.
      terminated: [N] bool, a terminal state of the MDP was reached.
      truncated: [N] bool, the time limit was hit and the state is not terminal.
      final_obs: [N, ...] float32 true next observation of this transition, before any reset.
      episode_return: [N] float32 return of the episode that ended at this step (0 where not done).
      episode_length: [N] int32 its length (0 where not done).
    """

    obs: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    final_obs: jax.Array
    episode_return: jax.Array
    episode_length: jax.Array


class StepEnv:
    """An env as two pure functions of one copy, the shape gymnax and Brax give their envs.

    `VecEnv` vmaps them, resets the copies whose episode ended, and counts episodes. Per copy and
    step it splits the copy's key into a step key and a reset key (gymnax's own `step` does the
    same), so a `StepEnv` stepped by `VecEnv` and the family's own autoresetting `step` see the
    same keys.

    Attributes:
      id: the env's id, e.g. "gymnax/Breakout-MinAtar".
      observation_space, action_space: gymnasium spaces of one copy.
      max_episode_steps: the time limit (None: none).
      time_limit_in_step: True where `step` reports the time limit itself (its `truncated`), so
        `VecEnv` adds none of its own; False where `VecEnv` truncates at `max_episode_steps`.
      default_params: the env's parameters (a pytree), which `reset` and `step` take.
    """

    id: str
    observation_space: Any
    action_space: Any
    max_episode_steps: int | None = None
    time_limit_in_step: bool = False
    default_params: Any = None

    def reset(self, key: jax.Array, params: Any) -> tuple[Any, jax.Array]:
        """(state, observation) of a fresh episode."""
        raise NotImplementedError

    def step(self, key: jax.Array, state: Any, action: jax.Array, params: Any) -> tuple[Any, ...]:
        """(next state, true next observation, reward, terminated, truncated): no autoreset."""
        raise NotImplementedError

    def with_params(self, params: Any, overrides: dict[str, Any]) -> Any:
        """`params` with the named entries replaced (traced values welcome)."""
        raise NotImplementedError

    def param_names(self) -> tuple[str, ...]:
        """The names `with_params` accepts."""
        raise NotImplementedError


def _where(done: jax.Array, if_done: jax.Array, otherwise: jax.Array) -> jax.Array:
    """`jnp.where` with the [N] mask `done` broadcast over the trailing axes."""
    return jnp.where(done.reshape(done.shape + (1,) * (jnp.ndim(otherwise) - 1)), if_done, otherwise)


class VecEnv:
    """N copies of a FuncEnv stepped in lockstep under vmap, with autoreset and a time limit.

    Args:
      env: any FuncEnv (kl_rl's ports, gymnasium's phys2d envs, your own), or a `StepEnv` (the
        adapted env families).
      num_envs: N.
      max_episode_steps: time limit; None takes `env.max_episode_steps` if the env has one,
        and otherwise there is no time limit.
      params: env params; None takes `env.default_params`.
      group_size: G; `reset` starts each run of G consecutive envs from the same initial state
        (GRPO's G samples per prompt). The envs then step with their own keys, and an episode
        that ends mid-rollout restarts on its own.
    """

    def __init__(self, env: FuncEnv | StepEnv, num_envs: int, max_episode_steps: int | None = None, params: Any = None,
                 group_size: int = 1):  # fmt: skip
        self.env = env
        self.num_envs = int(num_envs)
        self.group_size = int(group_size)
        if self.group_size < 1 or self.num_envs % self.group_size:
            raise ValueError(f"group size {group_size} must divide the {num_envs} envs")
        self.max_episode_steps = (
            max_episode_steps if max_episode_steps is not None else getattr(env, "max_episode_steps", None)
        )
        self.params = params if params is not None else getattr(env, "default_params", None)
        self.observation_space = env.observation_space
        self.action_space = env.action_space

    def _keys(self, key: jax.Array, num: int) -> list[jax.Array]:
        """`num` independent [N] batches of keys, one per FuncEnv call.

        Each batch comes from its own split, so the batches an env ignores (all but `initial`'s
        for the deterministic classic-control envs) are dead code that XLA removes.
        """
        return [jax.random.split(k, self.num_envs) for k in jax.random.split(key, num)]

    def _initial(self, init_keys: jax.Array, obs_keys: jax.Array) -> tuple[Any, jax.Array]:
        env, params = self.env, self.params
        state = jax.vmap(lambda k: env.initial(k, params))(init_keys)
        obs = jax.vmap(lambda s, k: env.observation(s, k, params))(state, obs_keys)
        return state, jnp.asarray(obs, jnp.float32)

    def with_params(self, overrides: dict[str, Any]) -> "VecEnv":
        """A copy whose env params have the named entries replaced (values may be traced: a
        config's `env_params`). No overrides: this VecEnv itself, params untouched."""
        if not overrides:
            return self
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.params = env_params_with(self.env, self.params, overrides)
        # A family whose time limit is a param (gymnax's max_steps_in_episode): a concrete new
        # limit is also the evaluation's length. A traced one cannot size a loop; it keeps the old.
        limit = overrides.get(getattr(self.env, "time_limit_param", None))
        if limit is not None:
            with contextlib.suppress(jax.errors.ConcretizationTypeError):
                copy.max_episode_steps = int(limit)
        return copy

    def reset(self, key: jax.Array, batch_like: Any = ()) -> VecEnvState:
        """Starts fresh episodes in all N envs.

        Args:
          key: PRNG key.
          batch_like: unused here; `HostVecEnv.reset` reads it (the two share an interface).

        Returns:
          The state of the N envs at time 0.
        """
        del batch_like
        if isinstance(self.env, StepEnv):
            keys = jax.random.split(key, self.num_envs)
            if self.group_size > 1:
                keys = jnp.repeat(keys[:: self.group_size], self.group_size, axis=0)
            params = self.params
            env_state, obs = jax.vmap(lambda k: self.env.reset(k, params))(keys)
            obs = jnp.asarray(obs, jnp.float32)
        else:
            init_keys, obs_keys = self._keys(key, 2)
            if self.group_size > 1:
                init_keys = jnp.repeat(init_keys[:: self.group_size], self.group_size, axis=0)
            env_state, obs = self._initial(init_keys, obs_keys)
        zeros = jnp.zeros(self.num_envs, jnp.int32)
        return VecEnvState(env_state, obs, zeros, jnp.zeros(self.num_envs, jnp.float32), zeros)

    def step(self, key: jax.Array, state: VecEnvState, action: jax.Array) -> tuple[VecEnvState, StepOut]:
        """Steps all N envs once; the envs whose episode ends start a new one in the same step.

        Args:
          key: PRNG key.
          state: the N envs' state.
          action: [N, ...] one action per env.

        Returns:
          The next state, whose `obs` is the one to act on, and the transition's `StepOut`.
        """
        if isinstance(self.env, StepEnv):
            return self._step_env_step(key, state, action)
        env, params = self.env, self.params
        transition_keys, reward_keys, terminal_keys, obs_keys, init_keys, init_obs_keys = self._keys(key, 6)
        # Params are closed over, not mapped: they stay Python scalars where the env has them.
        next_env_state = jax.vmap(lambda s, a, k: env.transition(s, a, k, params))(
            state.env_state, action, transition_keys
        )
        reward = jax.vmap(lambda s, a, s_tp1, k: env.reward(s, a, s_tp1, k, params))(
            state.env_state, action, next_env_state, reward_keys
        )
        terminated = jax.vmap(lambda s, k: env.terminal(s, k, params))(next_env_state, terminal_keys)
        final_obs = jax.vmap(lambda s, k: env.observation(s, k, params))(next_env_state, obs_keys)
        reset_env_state, reset_obs = self._initial(init_keys, init_obs_keys)

        # Envs differ in dtypes (gymnasium's Pendulum returns a Python False): fix them here.
        reward, terminated = jnp.asarray(reward, jnp.float32), jnp.asarray(terminated, bool)
        time = state.time + 1
        # The time limit; where the episode also terminated, `advance` lets termination win.
        limit = self.max_episode_steps
        truncated = jnp.zeros_like(terminated) if limit is None else time >= limit
        env_state = jax.tree.map(
            # Cast back to the carried dtypes so the state is a fixed point for lax.scan.
            lambda reset, nxt, old: _where(terminated | truncated, reset, nxt).astype(old.dtype),
            reset_env_state,
            next_env_state,
            state.env_state,
        )
        return advance(state, env_state, reward, terminated, truncated, final_obs, reset_obs)

    def _step_env_step(self, key: jax.Array, state: VecEnvState, action: jax.Array) -> tuple[VecEnvState, StepOut]:
        env, params = self.env, self.params

        def one(k, s, a):
            step_key, reset_key = jax.random.split(k)
            nxt, obs, reward, terminated, truncated = env.step(step_key, s, a, params)
            reset_state, reset_obs = env.reset(reset_key, params)
            return nxt, obs, reward, terminated, truncated, reset_state, reset_obs

        keys = jax.random.split(key, self.num_envs)
        nxt, final_obs, reward, terminated, truncated, reset_state, reset_obs = jax.vmap(one)(
            keys, state.env_state, action
        )
        terminated, truncated = jnp.asarray(terminated, bool), jnp.asarray(truncated, bool)
        if not env.time_limit_in_step and self.max_episode_steps is not None:
            truncated = truncated | (state.time + 1 >= self.max_episode_steps)
        done = terminated | truncated
        env_state = jax.tree.map(
            lambda reset, n, old: _where(done, reset, n).astype(old.dtype), reset_state, nxt, state.env_state
        )
        return advance(state, env_state, reward, terminated, truncated, final_obs, reset_obs)


def env_params_with(env: Any, params: Any, overrides: dict[str, Any]) -> Any:
    """`params` of `env` with the entries named in `overrides` replaced, each cast to the dtype
    and shape of the value it replaces (`cast_like`)."""
    if isinstance(env, StepEnv):
        return env.with_params(params, overrides)
    if params is None or not dataclasses.is_dataclass(params):
        raise ValueError(f"{getattr(env, 'id', type(env).__name__)} has no params to override")
    return params.replace(**{name: cast_like(getattr(params, name), value) for name, value in overrides.items()})


def cast_like(old: Any, value: Any) -> jax.Array:
    """`value` as an array of `old`'s dtype and shape (an int param stays an int when swept as a
    traced float; a scalar fills an array field)."""
    old = jnp.asarray(old)
    return jnp.broadcast_to(jnp.asarray(value).astype(old.dtype), old.shape)


def param_names(env: Any) -> tuple[str, ...]:
    """The names `env_params_with` accepts for `env` (a StepEnv lists its own)."""
    if isinstance(env, StepEnv):
        return env.param_names()
    params = getattr(env, "default_params", None)
    if params is None or not dataclasses.is_dataclass(params):
        return ()
    return tuple(f.name for f in dataclasses.fields(params))


def advance(
    state: VecEnvState,
    env_state: Any,
    reward: jax.Array,
    terminated: jax.Array,
    truncated: jax.Array,
    final_obs: jax.Array,
    reset_obs: jax.Array,
) -> tuple[VecEnvState, StepOut]:
    """The bookkeeping of one step of N envs, shared by the JAX and the host-side vector envs.

    Args:
      state: the N envs' state before the step.
      env_state: the envs' next state, already reset where an episode ended.
      reward, terminated: [N] what the step returned.
      truncated: [N] the time limit was hit; where `terminated` is also set, termination wins.
      final_obs: [N, ...] the true next observation of each transition.
      reset_obs: [N, ...] the first observation of a new episode (used where the episode ended).

    Returns:
      The next state, whose `obs` is the one to act on, and the transition's `StepOut`.
    """
    reward, terminated = jnp.asarray(reward, jnp.float32), jnp.asarray(terminated, bool)
    truncated = jnp.asarray(truncated, bool) & ~terminated
    final_obs = jnp.asarray(final_obs, jnp.float32)
    done = terminated | truncated
    time = state.time + 1
    episode_return = state.episode_return + reward
    episode_length = state.episode_length + 1
    new_state = VecEnvState(
        env_state=env_state,
        obs=_where(done, jnp.asarray(reset_obs, jnp.float32), final_obs),
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
