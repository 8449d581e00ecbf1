"""Stale data: the behaviour policy as an anchor, through policy lag and a replay window.

Asynchronous actors (IMPALA, Espeholt et al. 2018) act with an older policy than the learner
updates; reusing rollouts (a replay window) does the same to the data. The agents correct for it
with the behaviour policy's log-probs and distributions that every transition records (V-trace's
truncated importance weights, decoupled PPO's KL to the behaviour policy). The loop
(`kl_rl.train`) composes this module:

- `policy_lag` L: the agent state of L updates ago acts (`behaviour`); a ring of the last L
  agent states rides in the train state (`init_lag`, `push`). Until L updates have passed, the
  initial policy is the oldest there is.
- `replay_rollouts` K: the update sees the last K rollouts (`add`); the first rollout fills
  every place of the window, so every update sees K rollouts' worth of data.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kl_rl import buffer


class Staleness(NamedTuple):
    """How stale a run's data is: `lag` updates of policy lag, a window of `replay` rollouts."""

    lag: int = 0
    replay: int = 1

    def capacity(self, rollout_steps: int) -> int:
        """The buffer's time steps: the replay window's rollouts."""
        return self.replay * rollout_steps

    def init_lag(self, agent_state: Any) -> buffer.BufferState | None:
        """The ring of the last `lag` agent states, every place the initial state; None without lag."""
        if not self.lag:
            return None
        history = buffer.init(self.lag, agent_state)
        return buffer.add_batch(history, jax.tree.map(lambda x: jnp.stack([x] * self.lag), agent_state))

    def behaviour(self, lagged: buffer.BufferState | None, agent_state: Any) -> Any:
        """The agent state that acts: the oldest of the ring (`lag` updates ago), else the current one."""
        if not self.lag:
            return agent_state
        return jax.tree.map(lambda x: x[lagged.insert_pos], lagged.data)

    def push(self, lagged: buffer.BufferState | None, agent_state: Any) -> buffer.BufferState | None:
        """The ring with the agent state that just acted on the newest rollout."""
        return buffer.add(lagged, agent_state) if self.lag else lagged

    def add(self, buf: buffer.BufferState, trajectory: Any, update_count: jax.Array) -> buffer.BufferState:
        """The buffer with the newest rollout; the first one fills the whole replay window."""
        if self.replay == 1:
            return buffer.add_batch(buf, trajectory)
        tiled = jax.tree.map(lambda x: jnp.concatenate([x] * self.replay), trajectory)
        return jax.lax.cond(
            update_count == 0,
            lambda: buffer.add_batch(buf, tiled),
            lambda: buffer.add_batch(buf, trajectory),
        )
