"""PPO on language-model responses, with a per-token KL penalty in the reward (Ziegler et al.
2019; TRL's PPO).

The reward at each token is the verifier's (at EOS) minus beta times an estimate of
KL(pi || pi_ref) there (`--ref-kl-estimator`; TRL's penalty modes: kl = k1, abs = abs,
mse = k2, full = exact; and k3). A transformer critic of the policy's shape gives each token's
value; advantages are GAE over the response's tokens (`kl_rl.returns.token_gae`), normalized
over the batch; the loss is the clipped token surrogate and PPO2's clipped value loss.
"""

import flax.struct
import gymnasium as gym
import jax.numpy as jnp

from kl_rl.agents.base import Agent
from kl_rl.agents.common import explained_variance, kl_controller, value_loss
from kl_rl.agents.lm.common import policy_gradient_loss, reference_loss, regularized, sequence_agent, token_networks
from kl_rl.agents.lm.config import ClippedConfig
from kl_rl.agents.lm.losses import masked_mean
from kl_rl.config import static
from kl_rl.errors import ConfigError
from kl_rl.returns import token_gae


@flax.struct.dataclass
class PPOLMConfig(ClippedConfig):
    """PPO with a per-token KL penalty in the reward and a transformer critic (TRL's PPO)."""

    update_epochs: int = static(4)
    """PPO epochs over each batch (TRL's 4)."""
    num_minibatches: int = static(4)
    """Minibatches per epoch."""
    ref_kl_coef: float = 0.05
    """beta of the per-token KL penalty in the reward."""
    ref_kl_in: str = static("reward")
    """Per-token penalty in the reward (TRL)."""
    ref_kl_estimator: str = static("k1")
    """TRL's modes: k1 (kl), abs, k2 (mse), exact (full); or k3."""
    gamma: float = 1.0
    """Discount over the response's tokens."""
    gae_lambda: float = 0.95
    """GAE lambda over the response's tokens."""
    normalize_advantages: bool = static(True)
    """Normalize the advantages over the batch's tokens to zero mean and unit std."""
    vf_coef: float = 0.1
    """Value loss coefficient (TRL's 0.1)."""
    clip_value: bool = static(True)
    """Clip the value update to +/- clip_eps around the behaviour value (TRL's cliprange_value)."""

    def validate(self, action_space: gym.Space) -> None:
        super().validate(action_space)
        if not 0.0 <= float(self.gamma) <= 1.0 or not 0.0 <= float(self.gae_lambda) <= 1.0:
            raise ConfigError("{gamma} and {gae_lambda} must lie in [0, 1]", "gamma", "gae_lambda")


def ppo_lm(config: PPOLMConfig, observation_space: gym.Space, action_space: gym.Space) -> Agent:
    """PPO-LM's pure functions for a token task's spaces. Metrics: `pg_loss`, `clip_frac`,
    `vf_loss`, `explained_variance` of the behaviour critic, and `sequence_agent`'s."""
    nets = token_networks("ppo-lm", config, observation_space, action_space)

    def estimate(b):
        adv_t, returns_t = token_gae(b.reward.T, b.value.T, b.mask.T, config.gamma, config.gae_lambda)
        adv, returns = adv_t.T, returns_t.T
        if config.normalize_advantages:
            mean = masked_mean(adv, b.mask, "token")
            std = jnp.sqrt(masked_mean(jnp.square(adv - mean), b.mask, "token"))
            adv = (adv - mean) / (std + 1e-8) * b.mask
        return (adv, returns), {"explained_variance": explained_variance(returns * b.mask, b.value * b.mask)}

    def loss(params, b, targets, betas):
        adv, returns = targets
        dist, pg_loss, aux = policy_gradient_loss(nets, config, params, b, adv)
        # value_loss averages over every position; rescaled to the mean over the response's tokens.
        m = b.mask.astype(bool)
        v = nets.response_values(params, b.tokens)
        vf = value_loss(jnp.where(m, v, 0.0), b.value, jnp.where(m, returns, 0.0), config.clip_eps,
                        config.clip_value) * b.mask.size / jnp.maximum(jnp.sum(b.mask), 1.0)  # fmt: skip
        total = regularized(pg_loss + config.vf_coef * vf, config, dist, b, betas[0])
        return total + reference_loss(config, dist, b, betas[1]), {**aux, "vf_loss": vf}

    return sequence_agent(config, nets, estimate, loss, kl_controller(config), group_size=config.group_size,
                          critic=True)  # fmt: skip
