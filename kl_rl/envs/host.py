"""The host-side path: any gymnasium id, stepped on the host from inside the compiled program.

An env with no JAX port (MuJoCo, Box2D, your own) runs as a gymnasium vector env, sync or async
across processes (the SyncVectorEnv / AsyncVectorEnv that `gymnasium.make_vec` builds).
`HostVecEnv` has `VecEnv`'s interface, and its step is an `io_callback`, so the training loop,
the collector, the buffer and the agents are the very same jitted code on both paths: the whole
run is still one XLA program, which calls out to the host once per env step.

Under `vmap` (seeds, sweep points) the callback is not called once per batch element:
`custom_vmap` hands the whole batch to one call, which steps one vector env of
batch x num_envs copies. The copies are created on the first reset, with their size.

The vector env autoresets in the same step (gymnasium's `AutoresetMode.SAME_STEP`), which is
`VecEnv`'s semantics: the transition keeps its true next observation (`final_obs`), the policy
acts on the reset one, and the time limit's truncation stays apart from termination.
"""

import functools
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.experimental import io_callback

from kl_rl.envs.vector import StepOut, VecEnvState, advance
from kl_rl.errors import ConfigError

VECTORIZATION_MODES = ("sync", "async")
EXTRAS = ("mujoco", "box2d")
"""kl_rl's optional extras for gymnasium's env families: `pip install 'kl_rl[mujoco]'`."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _extra_of(env_id: str) -> str | None:
    """The kl_rl extra that provides `env_id`'s dependencies, from its registered entry point."""
    try:
        entry = str(gym.spec(env_id).entry_point)
    except gym.error.Error:
        return None
    return next((extra for extra in EXTRAS if f"gymnasium.envs.{extra}" in entry), None)


def check_spaces(env_id: str, observation_space: gym.Space, action_space: gym.Space) -> None:
    """ConfigError unless kl_rl's agents support the spaces: Box observations, Discrete or Box actions."""
    if not isinstance(observation_space, gym.spaces.Box):
        raise ConfigError(
            f"{env_id} has {type(observation_space).__name__} observations; kl_rl supports Box (array) "
            "observations only: wrap the env in gymnasium.wrappers.FlattenObservation and register that"
        )
    if isinstance(action_space, gym.spaces.Discrete):
        if int(action_space.start) != 0:
            raise ConfigError(
                f"{env_id} has Discrete actions starting at {int(action_space.start)}; kl_rl supports Discrete(n) "
                "starting at 0"
            )
    elif not isinstance(action_space, gym.spaces.Box) or len(action_space.shape) != 1:
        raise ConfigError(
            f"{env_id} has {action_space} actions; kl_rl supports Discrete(n) and one-dimensional Box actions"
        )


def _route_mujoco_warnings() -> None:
    """MuJoCo prints each compiler warning once per model it loads, and appends it to a
    MUJOCO_LOG.TXT in the working folder; send them through Python's `warnings` instead, which
    shows each one once per process (gymnasium's models trigger a deprecation notice in recent
    MuJoCo on every env made)."""
    try:
        import mujoco
    except ImportError:
        return
    if getattr(mujoco, "get_mju_user_warning", lambda: None)() is None and hasattr(mujoco, "set_mju_user_warning"):
        mujoco.set_mju_user_warning(lambda message: warnings.warn(f"MuJoCo: {message}", stacklevel=1))


def check_vectorization(vectorization: str) -> None:
    """ConfigError unless `vectorization` is one of VECTORIZATION_MODES."""
    if vectorization not in VECTORIZATION_MODES:
        raise ConfigError(
            f"unknown {{vectorization}} {vectorization!r}; use one of {', '.join(VECTORIZATION_MODES)}", "vectorization"
        )


def probe(env_id: str, kwargs: dict[str, Any] | None = None) -> gym.Env:
    """`gymnasium.make(env_id)`, with a one-line ConfigError for an unknown id or a missing extra."""
    try:
        return _make_env(env_id, kwargs or {})
    except gym.error.DependencyNotInstalled as err:
        extra = _extra_of(env_id)
        install = f"pip install 'kl_rl[{extra}]'" if extra else "install the package it names"
        raise ConfigError(f"{env_id} needs a package that is not installed ({_first_line(err)}); {install}") from None
    except (gym.error.Error, ModuleNotFoundError, ValueError) as err:
        from kl_rl.envs import ENV_IDS

        raise ConfigError(
            f"unknown env {env_id!r}: not a kl_rl JAX port ({', '.join(ENV_IDS)}) and gymnasium cannot make it "
            f"({_first_line(err)})"
        ) from None


@functools.cache
def _describe(env_id: str, kwargs: tuple[tuple[str, Any], ...]) -> tuple[gym.Space, gym.Space, int | None]:
    """(observation space, action space, time limit) of `env_id`, checked, from one throwaway
    instance per process: resolving a config and making the trainer's env both ask."""
    env = probe(env_id, dict(kwargs))
    try:
        check_spaces(env_id, env.observation_space, env.action_space)
        return env.observation_space, env.action_space, env.spec.max_episode_steps if env.spec is not None else None
    finally:
        env.close()


class GymEnv:
    """A gymnasium id to run on the host: what `kl_rl.envs.make` returns for an id with no JAX port.

    Making one checks the id, its dependencies and its spaces (ConfigError otherwise), with one
    throwaway instance per process and id.

    Args:
      env_id: a registered gymnasium id (or "module:Id", which imports the module first).
      vectorization: "sync" steps the copies in this process; "async" in one process each.
      **kwargs: passed to `gymnasium.make`.
    """

    def __init__(self, env_id: str, vectorization: str = "sync", **kwargs: Any):
        check_vectorization(vectorization)
        key = tuple(sorted(kwargs.items()))
        try:
            hash(key)
        except TypeError:  # unhashable gymnasium.make arguments: describe without the cache
            described = _describe.__wrapped__(env_id, key)
        else:
            described = _describe(env_id, key)
        self.observation_space, self.action_space, self.max_episode_steps = described
        self.id = env_id
        self.vectorization = vectorization
        self.kwargs = kwargs

    def make_vec(self, num_envs: int) -> gym.vector.VectorEnv:
        """`num_envs` copies as gymnasium's SyncVectorEnv or AsyncVectorEnv (what `gymnasium.make_vec`
        builds for a registered id), autoresetting in the same step."""
        env_fns = [functools.partial(_make_env, self.id, self.kwargs) for _ in range(num_envs)]
        if self.vectorization == "async":
            # Workers are spawned, not forked: a fork of a process running XLA's threads can hang.
            return gym.vector.AsyncVectorEnv(
                env_fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, context="spawn"
            )
        return gym.vector.SyncVectorEnv(env_fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)

    def __repr__(self) -> str:
        return f"GymEnv({self.id!r}, vectorization={self.vectorization!r})"


def _make_env(env_id: str, kwargs: dict[str, Any]) -> gym.Env:
    """One copy, made where it runs (in a worker process with async), MuJoCo's warnings routed first."""
    if _extra_of(env_id) == "mujoco":
        _route_mujoco_warnings()
    return gym.make(env_id, **kwargs)


def host_call(callback: Callable[..., Any], result: Callable[..., Any], *args: jax.Array, batch_like: Any = ()) -> Any:
    """`io_callback(callback, result(*args), *args)`, which `vmap` turns into one bigger call.

    Args:
      callback: the host function; it must accept its arguments with any extra leading axes.
      result: result(*args) -> the ShapeDtypeStructs of the callback's outputs for these args.
      *args: arrays.
      batch_like: a pytree passed along but not to the callback, so the call is batched along
        every `vmap` axis its leaves are batched along, even where `args` are not.

    Under `vmap` the batch axis is moved to the front (unbatched arguments are broadcast) and
    the callback is called once on the whole batch, instead of once per element as `io_callback`
    would be; nested `vmap`s stack their axes the same way, outermost first.
    """
    anchors = [jnp.sum(jnp.asarray(leaf, jnp.float32)) for leaf in jax.tree.leaves(batch_like)]
    num_args = len(args)

    @custom_vmap
    def call(*all_args):
        lead = all_args[:num_args]
        return io_callback(lambda *a: callback(*a[:num_args]), result(*lead), *all_args)

    @call.def_vmap
    def batched(axis_size, in_batched, *all_args):
        all_args = [
            a if b else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, b in zip(all_args, in_batched, strict=True)
        ]
        out = call(*all_args)
        return out, jax.tree.map(lambda _: True, out)

    return call(*args, *anchors)


class HostVecEnv:
    """N copies of a gymnasium env stepped on the host, with `VecEnv`'s interface.

    Args:
      env: the `GymEnv` to copy.
      num_envs: N, per batch element (per seed under `vmap`).

    Attributes:
      env_seconds: wall time spent inside the gymnasium vector env's reset and step.
      env_steps: env steps taken, summed over all copies.
    """

    def __init__(self, env: GymEnv, num_envs: int):
        self.env = env
        self.num_envs = int(num_envs)
        self.max_episode_steps = env.max_episode_steps
        self.observation_space = env.observation_space
        self.action_space = env.action_space
        self._vec: gym.vector.VectorEnv | None = None
        self.env_seconds = 0.0
        self.env_steps = 0
        # The copies (processes, with async) close with this object, or at exit.
        self._open: list[gym.vector.VectorEnv] = []
        weakref.finalize(self, _close, self._open)

    def close(self) -> None:
        """Closes the gymnasium vector env (and its worker processes)."""
        _close(self._open)
        self._vec = None

    @property
    def _obs_shape(self) -> tuple[int, ...]:
        return tuple(self.observation_space.shape)

    def _reset(self, key_data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Host side of `reset`: (re)makes the copies if the batch changed, seeds and resets them.

        Returns the first observations and each copy's index in the host vector env.
        """
        start = time.perf_counter()
        lead = key_data.shape[:-1]
        total = int(np.prod(lead, dtype=np.int64)) * self.num_envs
        if self._vec is None or self._vec.num_envs != total:
            self.close()
            self._vec = self.env.make_vec(total)
            self._open.append(self._vec)
        # Each copy's seed comes from its batch element's key, so a run is reproducible.
        seeds = [
            int(np.random.SeedSequence([*map(int, kd), i]).generate_state(1)[0])
            for kd in key_data.reshape(-1, key_data.shape[-1])
            for i in range(self.num_envs)
        ]
        obs, _ = self._vec.reset(seed=seeds)
        self.env_seconds += time.perf_counter() - start
        index = np.arange(total, dtype=np.int32).reshape(*lead, self.num_envs)
        return np.asarray(obs, np.float32).reshape(*lead, self.num_envs, *self._obs_shape), index

    def _step(self, action: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, ...]:
        """Host side of `step`: steps every copy; returns (reset obs, reward, terminated, truncated, final obs).

        `index` is each copy's index as `_reset` gave it, batched like the actions: it must be
        0, 1, ..., total - 1 in order, or the program's copies and the host's disagree.
        """
        start = time.perf_counter()
        action_shape = tuple(self.action_space.shape)
        lead = index.shape
        total = index.size
        if self._vec is None or self._vec.num_envs != total or not np.array_equal(index.reshape(-1), np.arange(total)):
            raise RuntimeError(f"{self.env.id}: {total} copies stepped that the last reset did not make in this order")
        obs, reward, terminated, truncated, info = self._vec.step(np.asarray(action).reshape(total, *action_shape))
        obs = np.asarray(obs, np.float32)
        final_obs = obs.copy()
        if "final_obs" in info:
            ended = np.flatnonzero(info["_final_obs"])
            final_obs[ended] = np.stack([np.asarray(info["final_obs"][i], np.float32) for i in ended])
        self.env_seconds += time.perf_counter() - start
        self.env_steps += total
        obs_shape = (*lead, *self._obs_shape)
        return (
            obs.reshape(obs_shape),
            np.asarray(reward, np.float32).reshape(lead),
            np.asarray(terminated, bool).reshape(lead),
            np.asarray(truncated, bool).reshape(lead),
            final_obs.reshape(obs_shape),
        )

    def reset(self, key: jax.Array, batch_like: Any = ()) -> VecEnvState:
        """Starts fresh episodes in all N copies, seeded from `key`.

        Args:
          key: PRNG key.
          batch_like: any pytree (the config, an env state) batched along every `vmap` axis the
            later steps are batched along. A sweep shares its seeds' keys across grid points; its
            configs tell the reset to make copies for every point, not only for every seed.

        Returns:
          The N copies' state; its `env_state` is each copy's index in the host vector env (the
          envs' own state lives on the host).
        """

        def result(key_data):
            lead = key_data.shape[:-1]
            obs = jax.ShapeDtypeStruct((*lead, self.num_envs, *self._obs_shape), jnp.float32)
            return obs, jax.ShapeDtypeStruct((*lead, self.num_envs), jnp.int32)

        obs, index = host_call(self._reset, result, jax.random.key_data(key), batch_like=batch_like)
        zeros = jnp.zeros(self.num_envs, jnp.int32)
        return VecEnvState(index, obs, zeros, jnp.zeros(self.num_envs, jnp.float32), zeros)

    def step(self, key: jax.Array, state: VecEnvState, action: jax.Array) -> tuple[VecEnvState, StepOut]:
        """Steps all N copies once; `key` is unused (the copies hold their own generators)."""
        del key

        def result(action, index):
            obs = jax.ShapeDtypeStruct((*index.shape, *self._obs_shape), jnp.float32)
            flag = jax.ShapeDtypeStruct(index.shape, jnp.bool_)
            return obs, jax.ShapeDtypeStruct(index.shape, jnp.float32), flag, flag, obs

        # The copy indices travel with the actions: the call is batched as the reset was.
        reset_obs, reward, terminated, truncated, final_obs = host_call(self._step, result, action, state.env_state)
        return advance(state, state.env_state, reward, terminated, truncated, final_obs, reset_obs)


def _close(open_envs: list[gym.vector.VectorEnv]) -> None:
    while open_envs:
        open_envs.pop().close()
