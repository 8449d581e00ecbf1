"""Environments: faithful JAX ports of gymnasium envs, and one vectorization layer.

Example::

    env = kl_rl.envs.make("CartPole-v1")  # a gymnasium FuncEnv
    vec = kl_rl.envs.VecEnv(env, num_envs=8)  # vmap + autoreset + time limit
"""

from gymnasium.experimental.functional import FuncEnv

from kl_rl.envs.classic import (
    Acrobot,
    AcrobotParams,
    CartPole,
    CartPoleParams,
    MountainCar,
    MountainCarContinuous,
    MountainCarContinuousParams,
    MountainCarParams,
    Pendulum,
    PendulumParams,
)
from kl_rl.envs.vector import StepOut, VecEnv, VecEnvState
from kl_rl.errors import ConfigError

_REGISTRY: dict[str, type[FuncEnv]] = {
    cls.id: cls for cls in (Acrobot, CartPole, MountainCar, MountainCarContinuous, Pendulum)
}
ENV_IDS: tuple[str, ...] = tuple(sorted(_REGISTRY))


def make(env_id: str) -> FuncEnv:
    """A new instance of the JAX port registered as `env_id`.

    Args:
      env_id: a gymnasium id, one of `ENV_IDS`.

    Raises:
      ConfigError: `env_id` is not registered; the message lists the ids that are.
    """
    if env_id not in _REGISTRY:
        raise ConfigError(f"unknown env {env_id!r}; available: {', '.join(ENV_IDS)}")
    return _REGISTRY[env_id]()


__all__ = [
    "ENV_IDS",
    "Acrobot",
    "AcrobotParams",
    "CartPole",
    "CartPoleParams",
    "MountainCar",
    "MountainCarContinuous",
    "MountainCarContinuousParams",
    "MountainCarParams",
    "Pendulum",
    "PendulumParams",
    "StepOut",
    "VecEnv",
    "VecEnvState",
    "make",
]
