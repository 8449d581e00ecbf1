"""The one replay buffer, and returns/advantages that bootstrap on truncation only.

A functional, jittable, fixed-capacity circular buffer over any pytree. In on-policy use an item
is one time step of a vectorized env (leaves [num_envs, ...]), so the data are time-major
[capacity, num_envs, ...]: a rollout of T steps is `add_batch`ed into a buffer of capacity T and
read back in order with `ordered`. Each `Transition` records the behaviour policy's distribution,
so any update can compute exact KL and importance ratios to the policy that collected the data.

Why not flashbax (0.1.3 works with jax 0.10): its buffers are built around sampling trajectory
windows for off-policy learning and pull in tensorstore; what kl_rl needs is a time-major
container that GAE can scan and that checkpoints as a plain pytree. The code below is short
enough to own, and keeps the dependency set to the core six.
"""

from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp


class Transition(NamedTuple):
    """One step of experience, with what the behaviour policy knew when it acted.

    Attributes:
      obs: the observation the policy acted on.
      action: the action taken (for Gaussians, the unclipped sample).
      reward: r_t.
      terminated: a true terminal state was reached: do not bootstrap.
      truncated: the time limit cut the episode: bootstrap from next_obs.
      next_obs: the true next observation of this transition, before any autoreset.
      value: V(obs) from the behaviour critic.
      log_prob: log pi_behaviour(action | obs).
      dist: the behaviour policy's distribution (a kl_rl.kl NamedTuple).
    """

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    next_obs: jax.Array
    value: jax.Array
    log_prob: jax.Array
    dist: Any


@flax.struct.dataclass
class BufferState:
    """Data with a leading capacity axis, the next write index and the number of valid items."""

    data: Any
    insert_pos: jax.Array
    size: jax.Array

    @property
    def capacity(self) -> int:
        return jax.tree.leaves(self.data)[0].shape[0]


def init(capacity: int, example_item: Any) -> BufferState:
    """An empty buffer of `capacity` items shaped like `example_item` (arrays or ShapeDtypeStructs)."""
    data = jax.tree.map(lambda x: jnp.zeros((capacity, *x.shape), x.dtype), example_item)
    return BufferState(data=data, insert_pos=jnp.zeros((), jnp.int32), size=jnp.zeros((), jnp.int32))


def add(state: BufferState, item: Any) -> BufferState:
    """Writes one item, overwriting the oldest when full."""
    return add_batch(state, jax.tree.map(lambda x: x[None], item))


def add_batch(state: BufferState, items: Any) -> BufferState:
    """Writes k items (leading axis, k <= capacity) in order, wrapping around the end."""
    capacity = state.capacity
    k = jax.tree.leaves(items)[0].shape[0]
    if k > capacity:
        raise ValueError(f"add_batch of {k} items exceeds the buffer's capacity {capacity}")
    if k == capacity:
        # A full overwrite: the write order is a rotation, and when insert_pos is 0 (every
        # on-policy rollout) the roll is the identity.
        data = jax.tree.map(lambda x: jnp.roll(x, state.insert_pos, axis=0), items)
    else:
        idx = (state.insert_pos + jnp.arange(k)) % capacity
        data = jax.tree.map(lambda buf, x: buf.at[idx].set(x), state.data, items)
    return BufferState(
        data=data,
        insert_pos=(state.insert_pos + k) % capacity,
        size=jnp.minimum(state.size + k, capacity),
    )


def sample(key: jax.Array, state: BufferState, batch_size: int) -> Any:
    """`batch_size` items drawn uniformly with replacement from the valid ones."""
    idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(state.size, 1))
    # Valid items are the `size` most recent: oldest is at insert_pos - size.
    idx = (state.insert_pos - state.size + idx) % state.capacity
    return jax.tree.map(lambda x: x[idx], state.data)


def ordered(state: BufferState) -> Any:
    """All `capacity` items, oldest first (chronological once the buffer is full)."""
    return jax.tree.map(lambda x: jnp.roll(x, -state.insert_pos, axis=0), state.data)


def gae(
    r_t: jax.Array,
    v_t: jax.Array,
    v_tp1: jax.Array,
    terminated_t: jax.Array,
    truncated_t: jax.Array,
    gamma: jax.Array,
    lambda_: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimation (Schulman et al. 2016), time-major [T, ...].

    delta_t = r_t + gamma (1 - terminated_t) V(s'_t) - V(s_t), where s'_t is the true next state of
    transition t, so a truncated step bootstraps and a terminated one does not. The recursion
    A_t = delta_t + gamma lambda (1 - done_t) A_{t+1} stops at every episode end
    (done = terminated | truncated), and A_T = 0 past the rollout, whose last step bootstraps
    from v_tp1.

    Args:
      r_t: rewards [T, ...].
      v_t: V(s_t) [T, ...].
      v_tp1: V(s'_t), the value of each transition's true next observation [T, ...].
      terminated_t, truncated_t: bool [T, ...].
      gamma, lambda_: discount and GAE lambda (may be traced).

    Returns:
      (advantages, returns) with returns = advantages + v_t.
    """
    not_terminated = 1.0 - terminated_t.astype(r_t.dtype)
    not_done = 1.0 - (terminated_t | truncated_t).astype(r_t.dtype)
    delta = r_t + gamma * not_terminated * v_tp1 - v_t

    def step(next_adv, xs):
        delta, not_done = xs
        adv = delta + gamma * lambda_ * not_done * next_adv
        return adv, adv

    _, advantages = jax.lax.scan(step, jnp.zeros_like(delta[0]), (delta, not_done), reverse=True)
    return advantages, advantages + v_t


def discounted_returns(
    r_t: jax.Array,
    v_tp1: jax.Array,
    terminated_t: jax.Array,
    truncated_t: jax.Array,
    gamma: jax.Array,
) -> jax.Array:
    """G_t = r_t + gamma (1 - terminated_t) * (V(s'_t) if the episode or rollout ends at t else G_{t+1}).

    Bootstraps on truncation and at the rollout's end, never on termination. Time-major [T, ...].
    """
    not_terminated = 1.0 - terminated_t.astype(r_t.dtype)
    cut = terminated_t | truncated_t

    def step(next_return, xs):
        r, v_next, not_term, cut = xs
        g = r + gamma * not_term * jnp.where(cut, v_next, next_return)
        return g, g

    _, returns = jax.lax.scan(step, v_tp1[-1], (r_t, v_tp1, not_terminated, cut), reverse=True)
    return returns
