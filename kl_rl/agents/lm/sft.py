"""Supervised fine-tuning (SFT) on a token task's oracle answers.

Teacher forcing: the oracle is the behaviour policy (its distribution in the buffer is a point
mass on its answer's token) and the loss is the next-token cross-entropy of its answers, scored
in one causal pass. An SFT run folder is the reference, and the starting point, of the online
algorithms (`--reference RUN_DIR`).
"""

from typing import ClassVar

import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp

from kl_rl import kl
from kl_rl.agents.base import Agent
from kl_rl.agents.lm import losses
from kl_rl.agents.lm.common import LMState, sequence_agent, token_networks
from kl_rl.agents.lm.config import SequenceConfig
from kl_rl.distributions import categorical


@flax.struct.dataclass
class SFTConfig(SequenceConfig):
    """Supervised fine-tuning on the task's oracle answers."""

    lr: float = 1e-3
    """Adam learning rate (constant)."""

    # The task's reward, which the loop reads of a token task's config, does not enter SFT's loss.
    format_reward: ClassVar[float] = 0.0


def sft(config: SFTConfig, observation_space: gym.Space, action_space: gym.Space) -> Agent:
    """SFT's pure functions for a token task's spaces. Metrics: `nll` (the loss),
    `token_accuracy` and `sequence_accuracy` of the greedy tokens, and `sequence_agent`'s."""
    nets = token_networks("sft", config, observation_space, action_space)
    task, vocab = observation_space.task, action_space.n

    def act(key: jax.Array, state: LMState, obs: jax.Array):
        del key, state
        action = task.oracle_action(obs)
        dist = categorical(jnp.zeros((*obs.shape[:-1], vocab)), jax.nn.one_hot(action, vocab) > 0)
        return action, jnp.zeros(action.shape, jnp.float32), dist

    def estimate(b):
        return None, {}

    def loss(params, b, targets, betas):
        del targets, betas
        dist = nets.response_dist(params, b.tokens)
        return losses.cross_entropy(dist.logits, dist.log_prob(b.action), b.action, b.mask)

    # No previous-iterate penalty: beta stays 0, in the controller every token-task state carries.
    return sequence_agent(config, nets, estimate, loss, kl.fixed_kl_controller(0.0), act=act)
