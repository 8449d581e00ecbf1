"""Group Relative Policy Optimization (GRPO; Shao et al. 2024, DeepSeekMath).

`group_size` G responses per prompt; each response's advantage (r - mean_group) / std_group is
applied at every one of its tokens in the clipped ratio, with `update_epochs` (mu) passes; the KL
to the reference goes in the loss with k3 (DeepSeek-R1), whose expected gradient is that of the
forward KL(pi_ref || pi) (the module doc of `kl_rl.agents.lm`).

Variants by flags: Dr. GRPO (Liu et al. 2025) is `scale_rewards=False` and `loss_norm=constant`;
DAPO's clip-higher (Yu et al. 2025) is `clip_eps_high` > `clip_eps`, its token-level mean
`loss_norm=token`.
"""

import flax.struct
import gymnasium as gym

from kl_rl.agents.base import Agent
from kl_rl.agents.lm import losses
from kl_rl.agents.lm.common import outcome_agent
from kl_rl.agents.lm.config import ClippedConfig
from kl_rl.config import static
from kl_rl.errors import ConfigError


@flax.struct.dataclass
class GRPOConfig(ClippedConfig):
    """GRPO: G samples per prompt, group-normalized advantages, k3 to the reference in the loss."""

    group_size: int = static(8)
    """G, responses per prompt."""
    ref_kl_coef: float = 0.04
    """beta of the KL to the reference (DeepSeekMath's 0.04)."""
    ref_kl_estimator: str = static("k3")
    """k3 in the loss, as GRPO (its expected gradient is the forward KL's; see the module doc)."""
    scale_rewards: bool = static(True)
    """Divide group-centred rewards by the group's std (GRPO); False is Dr. GRPO's."""
    group_std: str = static("population")
    """The group's std: population (divides by G; the default) or sample (by G - 1, TRL's)."""

    def validate(self, action_space: gym.Space) -> None:
        """Raises ConfigError on values no run could use."""
        super().validate(action_space)
        if self.group_std not in losses.GROUP_STDS:
            raise ConfigError(
                f"unknown {{group_std}} {self.group_std!r}; use one of {', '.join(losses.GROUP_STDS)}", "group_std"
            )
        if self.group_std == "sample" and self.group_size < 2:
            raise ConfigError("{group_std} sample needs {group_size} >= 2 responses per prompt", "group_std",
                              "group_size")  # fmt: skip


def grpo(config: GRPOConfig, observation_space: gym.Space, action_space: gym.Space) -> Agent:
    """GRPO's pure functions for a token task's spaces."""

    def advantages(reward):
        return losses.group_advantages(reward, config.group_size, config.scale_rewards, config.group_std)

    return outcome_agent("grpo", config, observation_space, action_space, advantages)
