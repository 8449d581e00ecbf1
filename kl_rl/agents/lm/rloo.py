"""REINFORCE Leave-One-Out (RLOO; Ahmadian et al. 2024).

`group_size` k responses per prompt; each response's advantage is its reward minus the mean of
the other k - 1 responses' (r_i - mean_{j != i} r_j), applied at every one of its tokens in the
clipped ratio. The KL to the reference goes in the reward (TRL's RLOO): r_t - beta k1 at each
token, summed over the response, which through the score function gives the gradient of the
reverse KL(pi || pi_ref).
"""

import flax.struct
import gymnasium as gym

from kl_rl.agents.base import Agent
from kl_rl.agents.lm import losses
from kl_rl.agents.lm.common import outcome_agent
from kl_rl.agents.lm.config import ClippedConfig
from kl_rl.config import static


@flax.struct.dataclass
class RLOOConfig(ClippedConfig):
    """RLOO: G samples per prompt, leave-one-out baseline, KL to the reference in the reward."""

    group_size: int = static(4)
    """G, responses per prompt (RLOO's k)."""
    ref_kl_coef: float = 0.05
    """beta of the per-token KL penalty in the reward."""
    ref_kl_in: str = static("reward")
    """The penalty goes in the reward (summed over the response), as in TRL's RLOO."""
    ref_kl_estimator: str = static("k1")
    """k1 in the reward: through the score function, the gradient of KL(pi || pi_ref)."""


def rloo(config: RLOOConfig, observation_space: gym.Space, action_space: gym.Space) -> Agent:
    """RLOO's pure functions for a token task's spaces."""

    def advantages(reward):
        return losses.leave_one_out_advantages(reward, config.group_size)

    return outcome_agent("rloo", config, observation_space, action_space, advantages)
