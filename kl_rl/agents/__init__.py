"""The algorithms. Each registers its config class and agent factory in `ALGOS`."""

from collections.abc import Callable
from typing import NamedTuple

from kl_rl.agents.base import Agent
from kl_rl.agents.ppo import PPOConfig, ppo


class AlgoSpec(NamedTuple):
    """An algorithm's config class and its factory make(config, obs_space, action_space)."""

    config: type
    make: Callable[..., Agent]


ALGOS: dict[str, AlgoSpec] = {
    "ppo": AlgoSpec(PPOConfig, ppo),
}

__all__ = ["ALGOS", "Agent", "AlgoSpec", "PPOConfig", "ppo"]


def algo_spec(name: str) -> AlgoSpec:
    """The spec of a registered algorithm, or a ConfigError listing the registered ones."""
    from kl_rl.errors import ConfigError

    if name not in ALGOS:
        raise ConfigError(f"unknown algo {name!r}; available: {', '.join(sorted(ALGOS))}")
    return ALGOS[name]


