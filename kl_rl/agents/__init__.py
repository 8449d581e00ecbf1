"""The algorithms. Each registers its config class and agent factory in `ALGOS`."""

from collections.abc import Callable
from typing import NamedTuple

from kl_rl.agents.awr import AWRConfig, awr
from kl_rl.agents.base import Agent
from kl_rl.agents.cem import CEMConfig, cem
from kl_rl.agents.lm import DPOConfig, GRPOConfig, PPOLMConfig, RLOOConfig, SFTConfig, dpo, grpo, ppo_lm, rloo, sft
from kl_rl.agents.mdpo import MDPOConfig, mdpo
from kl_rl.agents.mpo import MPOConfig, mpo
from kl_rl.agents.ppo import PPOConfig, ppo
from kl_rl.agents.trpo import TRPOConfig, trpo
from kl_rl.agents.vmpo import VMPOConfig, vmpo
from kl_rl.agents.vpg import VPGConfig, vpg


class AlgoSpec(NamedTuple):
    """An algorithm's config class and its factory make(config, obs_space, action_space)."""

    config: type
    make: Callable[..., Agent]


ALGOS: dict[str, AlgoSpec] = {
    "ppo": AlgoSpec(PPOConfig, ppo),
    "vpg": AlgoSpec(VPGConfig, vpg),
    "trpo": AlgoSpec(TRPOConfig, trpo),
    "cem": AlgoSpec(CEMConfig, cem),
    "mdpo": AlgoSpec(MDPOConfig, mdpo),
    "vmpo": AlgoSpec(VMPOConfig, vmpo),
    "mpo": AlgoSpec(MPOConfig, mpo),
    "awr": AlgoSpec(AWRConfig, awr),
    "sft": AlgoSpec(SFTConfig, sft),
    "grpo": AlgoSpec(GRPOConfig, grpo),
    "rloo": AlgoSpec(RLOOConfig, rloo),
    "ppo-lm": AlgoSpec(PPOLMConfig, ppo_lm),
    "dpo": AlgoSpec(DPOConfig, dpo),
}
SEQUENCE_ALGOS: tuple[str, ...] = ("sft", "grpo", "rloo", "ppo-lm", "dpo")
"""The algorithms of the token tasks (`kl_rl.agents.lm`); the others train on control envs."""

__all__ = [
    "ALGOS",
    "SEQUENCE_ALGOS",
    "AWRConfig",
    "Agent",
    "AlgoSpec",
    "CEMConfig",
    "MDPOConfig",
    "MPOConfig",
    "PPOConfig", "TRPOConfig",
    "VMPOConfig",
    "VPGConfig",
    "awr",
    "cem",
    "mdpo",
    "mpo",
    "ppo",
    "trpo",
    "vmpo",
    "vpg",
]


def algo_spec(name: str) -> AlgoSpec:
    """The spec of a registered algorithm, or a ConfigError listing the registered ones."""
    from kl_rl.errors import ConfigError

    if name not in ALGOS:
        raise ConfigError(f"unknown algo {name!r}; available: {', '.join(sorted(ALGOS))}")
    return ALGOS[name]


