"""Adapters for the JAX-native env families: gymnax, Brax (with Brax's MJX pipeline) and navix.

An id names its family: ``gymnax/Breakout-MinAtar``, ``brax/hopper``, ``mjx/hopper``. Each
adapter is a `kl_rl.envs.vector.StepEnv`, so the one `VecEnv` gives it vmap, autoreset, the time
limit, terminated kept apart from truncated, the true final observation and episode statistics,
and a whole run on it is one XLA program like a run on kl_rl's own ports.

How each family's own autoreset and time limit are handled:

- **gymnax** (1.0.x). The adapter calls the env's `step_env` and `reset_env`, which do neither;
  `VecEnv` resets, splitting each copy's key into a step and a reset key exactly as gymnax's own
  `step` does, so a run sees the same transitions as gymnax's autoresetting `step` from the same
  keys. The time limit is gymnax's: `truncated` is the env's `is_truncated` (time >=
  `max_steps_in_episode`, a param), and `terminated` is `step_env`'s natural termination. Where
  both hold, termination wins (no bootstrap). Observations are flattened to one float32 vector,
  as PureJaxRL's `FlattenObservationWrapper` does (MinAtar's 10x10xC images become 100*C
  features for the MLP policies), except for a conv net (`--network cnn`), which gets the
  images (`GymnaxEnv.images`, `kl_rl.envs.with_images`). Where an env's declared bounds do not hold its observations
  (`GYMNAX_UNBOUNDED`: MemoryChain-bsuite), the adapter's Box is unbounded.
- **Brax** (`brax/...`: the generalized pipeline, Brax's default; `brax-positional/...`,
  `brax-spring/...`; `mjx/...`: MuJoCo MJX). The adapter uses the raw env, which has neither.
  Brax's training wrappers are not used: its `AutoResetWrapper` restarts an ended episode from
  the first state of the episode (the same initial state again), where `VecEnv` draws a fresh
  one, and its `EpisodeWrapper` folds the time limit into `done`. `VecEnv` truncates at
  `max_episode_steps` = 1000 (Brax's training default); `terminated` is the env's own `done`
  (Hopper, Walker2d, Ant and Humanoid end when unhealthy).

- **navix** (`navix/...`). Its `step` autoresets lazily: the call after a done step returns the
  reset timestep, a transition whose action is ignored. The adapter turns that off: it calls
  navix's `_step` (the transition itself) and `reset`, and `VecEnv` resets in the same step with
  a fresh key. The time limit is navix's (`max_steps`, 100 as `navix.make` sets it): `truncated`
  and `terminated` are its step types 1 and 2. Observations are flattened to float32.

Env params (a config's `env_params`, `--env.NAME VALUE` on the CLI) are traced, so `vmap` can
sweep or randomize them: gymnax's `EnvParams` fields by name (e.g. ``max_steps_in_episode``),
and Brax `System` fields by dotted path (e.g. ``opt.timestep``, ``dof.damping``; a scalar fills
an array field). navix's env fields are all static, so it has none. gymnax's
`MNISTBandit-bsuite` is left out (it downloads MNIST when made), and so are Brax's `fast` (a
test stand-in with no System) and `swimmer` (Brax 0.14's fluid model calls `jnp.clip(a_min=...)`,
which current JAX rejects).
"""

import copy
import dataclasses
import contextlib
import importlib.util
import io
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from gymnasium import spaces

from kl_rl.envs.vector import StepEnv, cast_like, param_names
from kl_rl.errors import ConfigError

GYMNAX_LEFT_OUT = {"MNISTBandit-bsuite": "it downloads MNIST when made"}
GYMNAX_UNBOUNDED = {
    "MemoryChain-bsuite": "it shows its context bit as -1 or +1 under a declared Box(0, 2)",
}
"""gymnax envs whose declared observation bounds their observations break: the adapter gives
them an unbounded Box of the same shape."""
BRAX_LEFT_OUT = {
    "fast": "it is Brax's test stand-in, with no physical System",
    "swimmer": "Brax 0.14's fluid model calls jnp.clip(a_min=...), which this JAX no longer accepts",
}
BRAX_EPISODE_STEPS = 1000
"""The time limit of a Brax env: Brax's training default (`episode_length=1000`)."""


def _observation_box(space: Any, shape: tuple[int, ...], flatten: bool) -> spaces.Box:
    """A float32 Box of the observations' real `shape` (flattened), bounded by the family's space
    where its bounds fit that shape (gymnax's FrozenLake declares Discrete(16) for [1] floats);
    unbounded where `space` is None."""
    kind = type(space).__name__
    low, high = -np.inf, np.inf
    if kind == "Discrete":
        low, high = 0.0, float(space.n - 1)
    elif kind == "Box":
        low, high = np.asarray(space.low, np.float32), np.asarray(space.high, np.float32)
    try:
        low = np.broadcast_to(np.asarray(low, np.float32), shape)
        high = np.broadcast_to(np.asarray(high, np.float32), shape)
    except ValueError:
        low, high = np.full(shape, -np.inf, np.float32), np.full(shape, np.inf, np.float32)
    if flatten:
        low, high = low.reshape(-1), high.reshape(-1)
    return spaces.Box(low, high, dtype=np.float32)


def _action_space(space: Any) -> spaces.Space:
    """A gymnasium space for a gymnax action space."""
    kind = type(space).__name__
    if kind == "Discrete":
        return spaces.Discrete(int(space.n))
    if kind == "Box":
        shape = tuple(int(d) for d in space.shape)
        low = np.broadcast_to(np.asarray(space.low, np.float32), shape)
        high = np.broadcast_to(np.asarray(space.high, np.float32), shape)
        return spaces.Box(low, high, dtype=np.float32)
    raise ConfigError(f"kl_rl does not support gymnax {kind} spaces")


class GymnaxEnv(StepEnv):
    """A gymnax env as a `StepEnv` (see the module docstring for its semantics).

    Args:
      name: a gymnax id, e.g. "Breakout-MinAtar".
      flatten: flatten observations to one vector (the MLP policies need it).
    """

    time_limit_in_step = True
    time_limit_param = "max_steps_in_episode"

    def __init__(self, name: str, flatten: bool = True):
        import gymnax

        self.family_env, params = gymnax.make(name)
        self.id = f"gymnax/{name}"
        self.flatten = flatten
        self.default_params = params
        obs = jax.eval_shape(lambda k: self.family_env.reset_env(k, params)[0], jax.random.key(0))
        declared = None if name in GYMNAX_UNBOUNDED else self.family_env.observation_space(params)
        self.observation_space = _observation_box(declared, obs.shape, flatten)
        self.action_space = _action_space(self.family_env.action_space(params))
        self.max_episode_steps = int(params.max_steps_in_episode)

    def images(self) -> "GymnaxEnv | None":
        """This env with its observations unflattened, where they are images [H, W, C]
        (MinAtar's 10x10xC grids), for a conv net; None where they are not."""
        unflattened = self if not self.flatten else GymnaxEnv(self.id.partition("/")[2], flatten=False)
        return unflattened if len(unflattened.observation_space.shape) == 3 else None

    def _obs(self, obs: jax.Array) -> jax.Array:
        obs = jnp.asarray(obs, jnp.float32)
        return obs.reshape(-1) if self.flatten else obs

    def reset(self, key: jax.Array, params: Any) -> tuple[Any, jax.Array]:
        obs, state = self.family_env.reset_env(key, params)
        return state, self._obs(obs)

    def step(self, key: jax.Array, state: Any, action: jax.Array, params: Any) -> tuple[Any, ...]:
        if isinstance(self.action_space, spaces.Discrete):
            action = jnp.asarray(action, jnp.int32)
        obs, nxt, reward, terminated, _ = self.family_env.step_env(key, state, action, params)
        truncated = self.family_env.is_truncated(nxt, params)
        return nxt, self._obs(obs), jnp.asarray(reward, jnp.float32), terminated, truncated

    def param_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.default_params))

    def with_params(self, params: Any, overrides: dict[str, Any]) -> Any:
        return params.replace(**{k: cast_like(getattr(params, k), v) for k, v in overrides.items()})


class BraxEnv(StepEnv):
    """A Brax env (one of Brax's pipelines) as a `StepEnv` (see the module docstring).

    Args:
      name: a Brax env name, e.g. "hopper".
      backend: Brax's pipeline: generalized, positional, spring or mjx.
      family: the family name in the id ("brax", "brax-positional", "brax-spring", "mjx").
    """

    def __init__(self, name: str, backend: str, family: str):
        from brax import envs as brax_envs

        self.family_env = brax_envs.get_environment(name, backend=backend)
        self.id = f"{family}/{name}"
        self.backend = backend
        self.default_params = self.family_env.sys
        # Brax's `observation_size` runs a reset op by op (seconds); its shape is all that is needed.
        obs = jax.eval_shape(self.family_env.reset, jax.random.key(0)).obs
        inf = np.full(obs.shape[-1], np.inf, np.float32)
        self.observation_space = spaces.Box(-inf, inf, dtype=np.float32)
        ones = np.ones(self.family_env.action_size, np.float32)
        self.action_space = spaces.Box(-ones, ones, dtype=np.float32)
        self.max_episode_steps = BRAX_EPISODE_STEPS

    def _env(self, params: Any) -> Any:
        if params is self.default_params:
            return self.family_env
        env = copy.copy(self.family_env)  # Brax reads its System from the env: swap in a copy's
        env.sys = params
        return env

    def reset(self, key: jax.Array, params: Any) -> tuple[Any, jax.Array]:
        state = self._env(params).reset(key)
        return state, state.obs

    def step(self, key: jax.Array, state: Any, action: jax.Array, params: Any) -> tuple[Any, ...]:
        del key  # Brax's step is deterministic
        nxt = self._env(params).step(state, action)
        return nxt, nxt.obs, nxt.reward, nxt.done > 0, jnp.zeros((), bool)

    def param_names(self) -> tuple[str, ...]:
        names = []
        for path, _ in jax.tree_util.tree_flatten_with_path(self.default_params)[0]:
            parts = [str(getattr(p, "name", getattr(p, "key", getattr(p, "idx", p)))) for p in path]
            names.append(".".join(parts))
        return tuple(names)

    def with_params(self, params: Any, overrides: dict[str, Any]) -> Any:
        def leaf(path: str) -> Any:
            node = params
            for part in path.split("."):
                node = getattr(node, part)
            return node

        return params.tree_replace({k: cast_like(leaf(k), v) for k, v in overrides.items()})


class NavixEnv(StepEnv):
    """A navix grid world as a `StepEnv` (see the module docstring).

    Args:
      name: a navix id, e.g. "Navix-DoorKey-5x5-v0" (made with navix's defaults: `max_steps` 100).
    """

    time_limit_in_step = True

    def __init__(self, name: str):
        import navix

        self.family_env = navix.make(name)
        self.id = f"navix/{name}"
        obs_space, act_space = self.family_env.observation_space, self.family_env.action_space
        size = int(np.prod(obs_space.shape))
        self.observation_space = spaces.Box(
            np.full(size, float(obs_space.minimum), np.float32), np.full(size, float(obs_space.maximum), np.float32)
        )
        self.action_space = spaces.Discrete(int(act_space.maximum) + 1)
        self.max_episode_steps = int(self.family_env.max_steps)
        self.default_params = None

    def reset(self, key: jax.Array, params: Any) -> tuple[Any, jax.Array]:
        timestep = self.family_env.reset(key)
        return timestep, jnp.asarray(timestep.observation, jnp.float32).reshape(-1)

    def step(self, key: jax.Array, state: Any, action: jax.Array, params: Any) -> tuple[Any, ...]:
        del key  # navix keeps its own key in the state
        nxt = self.family_env._step(state, jnp.asarray(action, jnp.int32))
        obs = jnp.asarray(nxt.observation, jnp.float32).reshape(-1)
        return nxt, obs, jnp.asarray(nxt.reward, jnp.float32), nxt.step_type == 2, nxt.step_type == 1

    def param_names(self) -> tuple[str, ...]:
        return ()  # navix's env fields are static (pytree_node=False): nothing to trace

    def with_params(self, params: Any, overrides: dict[str, Any]) -> Any:
        raise ValueError("navix envs have no traced params")


@dataclasses.dataclass(frozen=True)
class Family:
    """An env family kl_rl adapts.

    Attributes:
      name: the id prefix, as in "gymnax/Breakout-MinAtar".
      module: the package that must be importable.
      extra: kl_rl's pip extra that installs it.
      ids: () -> the env names the family has (the part after "/").
      make: name -> the adapted env.
    """

    name: str
    module: str
    extra: str
    ids: Callable[[], tuple[str, ...]]
    make: Callable[[str], StepEnv]

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


def _gymnax_ids() -> tuple[str, ...]:
    import gymnax

    return tuple(n for n in gymnax.registered_envs if n not in GYMNAX_LEFT_OUT)


def _navix_ids() -> tuple[str, ...]:
    import navix

    return tuple(navix.registry())


def _brax_envs() -> Any:
    """`brax.envs`, imported without MuJoCo's "Failed to import warp" lines (MuJoCo Warp is an
    optional GPU pipeline; its import prints to stdout when NVIDIA's warp is missing)."""
    with contextlib.redirect_stdout(io.StringIO()):
        from brax import envs as brax_envs
    return brax_envs


def _brax_ids() -> tuple[str, ...]:
    return tuple(sorted(n for n in _brax_envs()._envs if n not in BRAX_LEFT_OUT))


def _brax_family(name: str, backend: str, extra: str) -> Family:
    def make(env_name: str) -> StepEnv:
        _brax_envs()
        return BraxEnv(env_name, backend, name)

    return Family(name, "brax", extra, _brax_ids, make)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("gymnax", "gymnax", "gymnax", _gymnax_ids, GymnaxEnv),
        _brax_family("brax", "generalized", "brax"),
        _brax_family("brax-positional", "positional", "brax"),
        _brax_family("brax-spring", "spring", "brax"),
        _brax_family("mjx", "mjx", "mjx"),
        Family("navix", "navix", "navix", _navix_ids, NavixEnv),
    )
}


def family_of(env_id: str) -> Family | None:
    """The family an id names ("gymnax/..."), or None for kl_rl's own and gymnasium's ids."""
    prefix, sep, _ = env_id.partition("/")
    return FAMILIES.get(prefix) if sep else None


def make_family_env(env_id: str) -> StepEnv:
    """The adapted env of a family id.

    Raises:
      ConfigError: the family's extra is not installed, or the family has no such env.
    """
    family = family_of(env_id)
    assert family is not None, env_id
    name = env_id.partition("/")[2]
    if not family.installed():
        raise ConfigError(
            f"{env_id} needs {family.module}, which is not installed: pip install 'kl_rl[{family.extra}]'"
        )
    left_out = GYMNAX_LEFT_OUT if family.name == "gymnax" else BRAX_LEFT_OUT if family.module == "brax" else {}
    if name in left_out:
        raise ConfigError(f"{env_id} is not adapted: {left_out[name]}")
    ids = family.ids()
    if name not in ids:
        raise ConfigError(f"{family.name} has no env {name!r}; its envs: {', '.join(ids)}")
    return family.make(name)


def installed_families() -> dict[str, tuple[str, ...]]:
    """{family: its env names} for the families whose package is installed."""
    return {name: f.ids() for name, f in FAMILIES.items() if f.installed()}


def check_env_params(env: Any, env_id: str, overrides: dict[str, Any]) -> None:
    """ConfigError naming the first override `env` has no param for."""
    names = param_names(env)
    for name in overrides:
        if name not in names:
            shown = ", ".join(names[:40]) + (", ..." if len(names) > 40 else "")
            raise ConfigError(f"{env_id} has no env param {name!r}; its params: {shown or '(none)'}")
