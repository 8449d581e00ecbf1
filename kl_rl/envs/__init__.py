"""Environments: faithful JAX ports of gymnasium envs, any other gymnasium env on the host.

Example::

    env = kl_rl.envs.make("CartPole-v1")  # a gymnasium FuncEnv: the JAX path
    vec = kl_rl.envs.vectorize(env, num_envs=8)  # VecEnv: vmap + autoreset + time limit
    env = kl_rl.envs.make("HalfCheetah-v5")  # no JAX port: a GymEnv, the host-side path
    vec = kl_rl.envs.vectorize(env, num_envs=8)  # HostVecEnv: gymnasium.make_vec on the host
    env = kl_rl.envs.make("gymnax/Breakout-MinAtar")  # a JAX-native family's env (a StepEnv)
    vec = kl_rl.envs.vectorize(env, num_envs=8)  # the same VecEnv: a run is one XLA program

The families (gymnax, Brax, Brax's MJX pipeline and navix) are optional extras; see
`kl_rl.envs.families` for how each one's autoreset and time limit are handled.
"""

from gymnasium.experimental.functional import FuncEnv

from kl_rl.envs.classic import (
    Acrobot,
    AcrobotParams,
    CartPole,
    CartPoleNoVel,
    CartPoleParams,
    MountainCar,
    MountainCarContinuous,
    MountainCarContinuousParams,
    MountainCarParams,
    Pendulum,
    PendulumParams,
)
from kl_rl.envs.families import FAMILIES, check_env_params, family_of, installed_families, make_family_env
from kl_rl.envs.tasks import TASKS, HeldOutVecEnv, SequenceTask, TokenSpace, is_token_space
from kl_rl.envs.host import VECTORIZATION_MODES, GymEnv, HostVecEnv, check_vectorization
from kl_rl.envs.vector import StepEnv, StepOut, VecEnv, VecEnvState, param_names
from kl_rl.errors import ConfigError

_REGISTRY: dict[str, type[FuncEnv]] = {
    cls.id: cls for cls in (Acrobot, CartPole, CartPoleNoVel, MountainCar, MountainCarContinuous, Pendulum, *TASKS)
}
ENV_IDS: tuple[str, ...] = tuple(sorted(_REGISTRY))
TASK_IDS: tuple[str, ...] = tuple(sorted(cls.id for cls in TASKS))
"""The verifiable token tasks (`kl_rl.envs.tasks`), among ENV_IDS."""


ENV_PATHS = ("auto", "jax", "host")
"""auto: the JAX port where there is one, else the host; jax: the port or an error; host: gymnasium."""


def make(env_id: str, path: str = "auto", vectorization: str = "sync") -> FuncEnv | StepEnv | GymEnv:
    """The env named `env_id`: its JAX port (a FuncEnv), a JAX-native family's env (a StepEnv),
    or a `GymEnv` that runs on the host.

    Args:
      env_id: one of `ENV_IDS`; a family's id, "gymnax/NAME", "brax/NAME", "brax-positional/NAME",
        "brax-spring/NAME", "mjx/NAME" or "navix/NAME" (`kl_rl.envs.families`); or any gymnasium id (with
        "module:Id", the module is imported).
      path: one of `ENV_PATHS`.
      vectorization: how the host path steps its copies, "sync" or "async" (processes).

    Raises:
      ConfigError: an unknown id or path, an env whose dependencies are not installed (naming the
        extra to install), or spaces kl_rl does not support.
    """
    check_vectorization(vectorization)
    if resolve_path(env_id, path) == "jax":
        if family_of(env_id) is not None:
            return make_family_env(env_id)
        return _REGISTRY[env_id]()
    return GymEnv(env_id, vectorization)


def resolve_path(env_id: str, path: str = "auto") -> str:
    """The path `make(env_id, path)` takes: "jax" or "host" (ConfigError for a bad combination)."""
    if path not in ENV_PATHS:
        raise ConfigError(f"unknown {{env_path}} {path!r}; use one of {', '.join(ENV_PATHS)}", "env_path")
    family = family_of(env_id)
    if family is not None:
        if path == "host":
            raise ConfigError(
                f"{env_id} is a {family.name} env, which runs inside JAX; use {{env_path}} auto or jax", "env_path"
            )
        return "jax"
    if env_id in _REGISTRY and path != "host":
        return "jax"
    if path == "jax":
        raise ConfigError(
            f"{env_id!r} has no JAX port (ported: {', '.join(ENV_IDS)}); use {{env_path}} auto or host", "env_path"
        )
    return "host"


def path_of(env: FuncEnv | GymEnv) -> str:
    """Which path an env made by `make` runs on: "jax" or "host"."""
    return "host" if isinstance(env, GymEnv) else "jax"


def with_images(env: FuncEnv | StepEnv | GymEnv, env_id: str = "") -> StepEnv:
    """`env` with image observations [H, W, C], unflattened, for a conv net (`--network cnn`):
    gymnax's MinAtar games (10x10xC).

    Raises:
      ConfigError: the env's observations are not images.
    """
    from kl_rl.envs.families import GymnaxEnv

    images = env.images() if isinstance(env, GymnaxEnv) else None
    if images is None:
        name = env_id or getattr(env, "id", type(env).__name__)
        raise ConfigError(
            f"{{network}} cnn needs image observations [H, W, C] (gymnax's MinAtar games), but {name}'s have "
            f"shape {env.observation_space.shape}; use {{network}} mlp",
            "network",
        )
    return images


def vectorize(
    env: FuncEnv | GymEnv, num_envs: int, evaluation: bool = False, group_size: int = 1
) -> VecEnv | HostVecEnv:
    """`num_envs` copies of `env` on its path, behind one interface (reset, step, spaces).

    With `evaluation`, a sequence task's copies reset to its held-out problems in order, with
    the format reward off (`kl_rl.envs.tasks.HeldOutVecEnv`); other envs ignore it. With
    `group_size` G > 1, each G consecutive copies reset to the same initial state (JAX path).
    """
    if isinstance(env, GymEnv):
        return HostVecEnv(env, num_envs)
    if evaluation and isinstance(env, SequenceTask):
        return HeldOutVecEnv(env, num_envs)
    return VecEnv(env, num_envs, group_size=group_size)


__all__ = [
    "ENV_IDS",
    "ENV_PATHS",
    "FAMILIES",
    "TASK_IDS",
    "VECTORIZATION_MODES",
    "Acrobot",
    "AcrobotParams",
    "CartPole",
    "CartPoleNoVel",
    "CartPoleParams",
    "GymEnv",
    "HostVecEnv",
    "MountainCar",
    "MountainCarContinuous",
    "MountainCarContinuousParams",
    "MountainCarParams",
    "Pendulum",
    "PendulumParams",
    "SequenceTask",
    "StepEnv",
    "StepOut",
    "TokenSpace",
    "VecEnv",
    "VecEnvState",
    "check_env_params",
    "family_of",
    "installed_families",
    "is_token_space",
    "make",
    "param_names",
    "path_of",
    "resolve_path",
    "vectorize",
    "with_images",
]
