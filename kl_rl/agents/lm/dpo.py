"""Online DPO / IPO on a token task (Guo et al. 2024; Calandriello et al. 2024).

The policy's own responses, ranked by the verifier: in each group of `group_size` responses to
one prompt, the best and the worst form a pair (none where they tie), and the loss is DPO's
(Rafailov et al. 2023) or IPO's (Azar et al. 2023) on the implicit rewards beta log(pi / pi_ref),
each log-ratio summed over the response's tokens, beta = ref_kl_coef. Its optimum is the
reverse-KL-regularized one, max E[r] - beta KL(pi || pi_ref); the KL to the reference is in the
loss by construction, so no other reference penalty applies.
"""

from typing import ClassVar

import flax.struct
import gymnasium as gym
import jax.numpy as jnp

from kl_rl.agents.base import Agent
from kl_rl.agents.common import kl_controller
from kl_rl.agents.lm import losses
from kl_rl.agents.lm.common import regularized, sequence_agent, token_networks
from kl_rl.agents.lm.config import OnlineConfig
from kl_rl.config import static
from kl_rl.errors import ConfigError


@flax.struct.dataclass
class DPOConfig(OnlineConfig):
    """Online DPO / IPO: pairs of the policy's own responses, ranked by the verifier."""

    group_size: int = static(2)
    """Responses per prompt; the best and the worst form the pair."""
    ref_kl_coef: float = 0.1
    """DPO's beta: the implicit reward is beta log(pi / pi_ref)."""
    dpo_loss: str = static("sigmoid")
    """sigmoid (DPO) or ipo (IPO)."""

    # What the loop reads of a config with a reference: DPO's beta is fixed and in its loss.
    ref_kl_in: ClassVar[str] = "loss"
    ref_kl_control: ClassVar[str] = "fixed"
    ref_kl_direction: ClassVar[str] = "reverse"

    def validate(self, action_space: gym.Space) -> None:
        super().validate(action_space)
        if self.group_size < 2:
            raise ConfigError(
                f"{{group_size}} must be >= 2 for online DPO (a pair per prompt), got {self.group_size}", "group_size"
            )
        if self.dpo_loss not in losses.PREFERENCE_LOSSES:
            raise ConfigError(
                f"unknown {{dpo_loss}} {self.dpo_loss!r}; use one of {', '.join(losses.PREFERENCE_LOSSES)}", "dpo_loss"
            )
        if not float(self.ref_kl_coef) > 0:
            raise ConfigError("{ref_kl_coef} is DPO's beta and must be > 0", "ref_kl_coef")


def dpo(config: DPOConfig, observation_space: gym.Space, action_space: gym.Space) -> Agent:
    """Online DPO's pure functions for a token task's spaces (it needs a reference). Metrics:
    `reward_chosen`, `reward_rejected`, `reward_margin` (implicit rewards, over pairs),
    `pair_frac`, and `sequence_agent`'s."""
    nets = token_networks("dpo", config, observation_space, action_space)

    def estimate(b):
        return jnp.sum(b.reward, -1), {}

    def loss(params, b, reward, betas):
        dist = nets.response_dist(params, b.tokens)
        per_token = jnp.where(b.mask > 0, dist.log_prob(b.action) - b.ref_dist.log_prob(b.action), 0.0)
        pair_loss, aux = losses.pair_loss(jnp.sum(per_token, -1), reward, config.group_size, betas[1], config.dpo_loss)
        return regularized(pair_loss, config, dist, b, betas[0]), aux

    return sequence_agent(config, nets, estimate, loss, kl_controller(config), group_size=config.group_size)
