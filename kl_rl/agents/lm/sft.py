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
from kl_rl.agents.lm.common import LMState, responses, sequence_agent, token_networks
from kl_rl.agents.lm.config import SequenceConfig
from kl_rl.config import static
from kl_rl.distributions import categorical
from kl_rl.errors import ConfigError


@flax.struct.dataclass
class SFTConfig(SequenceConfig):
    """Supervised fine-tuning on the task's oracle answers."""

    lr: float = 1e-3
    """Adam learning rate (constant)."""
    stop_at_accuracy: float = static(0.0)
    """Freeze the policy for the rest of the run at the first update whose fresh batch of prompts
    it answers greedily with at least this accuracy (measured before the update): a reference
    of known quality whatever the seed. 0: train to the end."""

    def validate(self, action_space: gym.Space) -> None:
        """Raises ConfigError on values no run could use."""
        super().validate(action_space)
        if not 0.0 <= float(self.stop_at_accuracy) <= 1.0:
            raise ConfigError(f"{{stop_at_accuracy}} must lie in [0, 1], got {self.stop_at_accuracy}",
                              "stop_at_accuracy")  # fmt: skip

    # The task's reward, which the loop reads of a token task's config, does not enter SFT's loss.
    format_reward: ClassVar[float] = 0.0


def sft(config: SFTConfig, observation_space: gym.Space, action_space: gym.Space) -> Agent:
    """SFT's pure functions for a token task's spaces. Metrics: `nll` (the loss),
    `token_accuracy` and `sequence_accuracy` of the greedy tokens, and `sequence_agent`'s; with
    stop_at_accuracy, `accuracy_before` (the greedy sequence accuracy on the update's prompts
    before it) and `stopped` (1 from the update that froze the policy on)."""
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
    agent = sequence_agent(config, nets, estimate, loss, kl.fixed_kl_controller(0.0), act=act)
    if not config.stop_at_accuracy:
        return agent

    def init(key: jax.Array) -> LMState:
        return agent.init(key).replace(stopped=jnp.array(False))

    def update(key: jax.Array, state: LMState, traj, ctx):
        # Teacher-forced greedy tokens all right = the greedy answer is the oracle's, so this is the
        # policy's greedy accuracy on the update's fresh prompts, before it learns from them.
        b = responses(traj, nets.prompt_length, nets.pad)
        dist = nets.response_dist(state.params, b.tokens)
        _, before = losses.cross_entropy(dist.logits, dist.log_prob(b.action), b.action, b.mask)
        stopped = state.stopped | (before["sequence_accuracy"] >= config.stop_at_accuracy)
        new, metrics = agent.update(key, state, traj, ctx)
        # Once stopped, the update's state is the one it was given (with the flag set).
        kept = jax.tree.map(lambda old, updated: jnp.where(stopped, old, updated),
                            state.replace(stopped=stopped), new.replace(stopped=stopped))  # fmt: skip
        return kept, {**metrics, "accuracy_before": before["sequence_accuracy"], "stopped": stopped.astype(jnp.float32)}

    return agent._replace(init=init, update=update)
