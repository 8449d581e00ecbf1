"""The one replay buffer: rollouts, stale rollouts, an off-policy replay (returns: `kl_rl.returns`).

A functional, jittable, fixed-capacity circular buffer over any pytree. In on-policy use an item
is one time step of a vectorized env (leaves [num_envs, ...]), so the data are time-major
[capacity, num_envs, ...]: a rollout of T steps is `add_batch`ed into a buffer of capacity T and
read back in order with `ordered`. Each `Transition` records the behaviour policy's distribution,
so any update can compute exact KL and importance ratios to the policy that collected the data.

Why not flashbax (0.1.3 works with jax 0.10): its buffers are built for off-policy sampling of
trajectory windows (uniform or prioritised) and it pulls in tensorstore; kl_rl's main use is a
time-major rollout container that GAE scans in order and that checkpoints as a plain pytree. The
few functions below cover that and uniform sampling without adding a dependency.

Off-policy learning (MPO) keeps one buffer across updates instead: `RolloutSpec.replay_capacity`
time steps of the vectorized env, to which the loop adds each rollout, and from which the agent
draws uniform windows of consecutive steps (`sample_windows`) for n-step targets.
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
      terminated: bool, a true terminal state was reached: do not bootstrap.
      truncated: bool, the time limit cut the episode: bootstrap from next_obs.
      next_obs: the true next observation of this transition, before any autoreset.
      value: V(obs) from the behaviour critic.
      log_prob: log pi_behaviour(action | obs).
      dist: the behaviour policy's distribution as a pytree (a kl_rl.distributions NamedTuple).
      ref_dist: a frozen reference policy's distribution at obs, for runs with a reference
        (`kl-rl train --reference`); None otherwise.
      policy_state: a stateful policy's state as it acted on obs (after any reset where an
        episode starts); None for a stateless policy. An update unrolls the policy from the
        state at its data's first step (`kl_rl.networks.unroll`).
      start: bool, a stateful policy's state was reset before obs, where an episode starts
        (except after an env's first episode in an episodic rollout, which keeps the state:
        `kl_rl.rollout.collect`); None for a stateless policy.
      next_policy_state: a stateful policy's state after acting on obs, before any reset where
        the episode ends: the state next_obs is read with, which a critic of the policy's state
        bootstraps a truncated step from; None for a stateless policy.
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
    ref_dist: Any = None
    policy_state: Any = None
    start: Any = None
    next_policy_state: Any = None


def in_first_episode(traj: Transition) -> jax.Array:
    """[T, N] mask of the steps of each env's first episode in a [T, N] trajectory (its last
    step included): what an episodic agent (CEM, the token-task agents) learns from, since the
    steps after an env's first episode ends belong to an episode its rollout cuts short."""
    done = (traj.terminated | traj.truncated).astype(jnp.int32)
    return (jnp.cumsum(done, axis=0) - done) == 0


@flax.struct.dataclass
class BufferState:
    """A circular buffer's contents.

    Attributes:
      data: pytree, each leaf [capacity, *item_leaf_shape].
      insert_pos: int32 scalar, the index the next item is written to (the oldest item once full).
      size: int32 scalar, the number of valid items, at most capacity.
    """

    data: Any
    insert_pos: jax.Array
    size: jax.Array

    @property
    def capacity(self) -> int:
        """The number of items the buffer holds (static: the leaves' leading dimension)."""
        return jax.tree.leaves(self.data)[0].shape[0]


def init(capacity: int, example_item: Any) -> BufferState:
    """An empty buffer.

    Args:
      capacity: number of items (static).
      example_item: a pytree of arrays or `jax.ShapeDtypeStruct`s giving one item's shapes.

    Returns:
      A buffer of zeros, size 0, writing next at index 0.
    """
    data = jax.tree.map(lambda x: jnp.zeros((capacity, *x.shape), x.dtype), example_item)
    zero = jnp.zeros((), jnp.int32)
    return BufferState(data=data, insert_pos=zero, size=zero)


def add(state: BufferState, item: Any) -> BufferState:
    """Writes one item, overwriting the oldest when full."""
    return add_batch(state, jax.tree.map(lambda x: x[None], item))


def add_batch(state: BufferState, items: Any) -> BufferState:
    """Writes k items in order, wrapping around the end and overwriting the oldest.

    Args:
      state: the buffer.
      items: a pytree like the buffer's items with a leading axis k (static, k <= capacity).

    Returns:
      The buffer with the items appended.
    """
    capacity = state.capacity
    k = jax.tree.leaves(items)[0].shape[0]
    if k > capacity:
        raise ValueError(f"add_batch of {k} items exceeds the buffer's capacity {capacity}")

    def like_buffer(buf, x):
        # Items replace the data outright when k == capacity: keep the buffer's shapes and dtypes
        # so a scan carrying the buffer stays type-stable.
        x = jnp.asarray(x, buf.dtype)
        if x.shape != (k, *buf.shape[1:]):
            raise ValueError(f"item leaf of shape {x.shape[1:]} in a buffer of {buf.shape[1:]}")
        return x

    items = jax.tree.map(like_buffer, state.data, items)
    size = jnp.minimum(state.size + k, capacity)
    if k == capacity:
        # Every slot is overwritten, so the old data and the old write position do not matter:
        # the items become the data as they are (no scatter, no copy) and the oldest is at 0.
        return BufferState(data=items, insert_pos=jnp.zeros((), jnp.int32), size=size)
    if k == 1:
        # One item never wraps: a dynamic_update_slice, which XLA does in place.
        def write(buf, x):
            return jax.lax.dynamic_update_slice_in_dim(buf, x, state.insert_pos, axis=0)
    else:
        idx = (state.insert_pos + jnp.arange(k)) % capacity

        def write(buf, x):
            return buf.at[idx].set(x, unique_indices=True)

    return BufferState(
        data=jax.tree.map(write, state.data, items),
        insert_pos=(state.insert_pos + k) % capacity,
        size=size,
    )


def sample(key: jax.Array, state: BufferState, batch_size: int) -> Any:
    """Draws items uniformly with replacement from the valid ones.

    Args:
      key: PRNG key.
      state: the buffer; sampling an empty one returns zeros.
      batch_size: number of items (static).

    Returns:
      A pytree like the buffer's items with a leading axis batch_size.
    """
    offset = jax.random.randint(key, (batch_size,), 0, jnp.maximum(state.size, 1))
    # The valid items are the `size` most recent, the oldest at insert_pos - size.
    idx = (state.insert_pos - state.size + offset) % state.capacity
    return jax.tree.map(lambda x: x[idx], state.data)


def ordered(state: BufferState) -> Any:
    """All `capacity` items, oldest first (chronological once the buffer is full).

    Right after a full-capacity `add_batch` in the same jit, insert_pos is the constant 0 and XLA
    folds the roll away, so an on-policy update reads the rollout without a copy.
    """
    return jax.tree.map(lambda x: jnp.roll(x, -state.insert_pos, axis=0), state.data)


def sample_windows(key: jax.Array, state: BufferState, batch_size: int, length: int) -> Any:
    """Draws windows of `length` consecutive time steps of one env, uniformly with replacement.

    The buffer is time-major over a vectorized env: each item holds one step of every env,
    leaves [num_envs, ...]. A window starts at one of the `size - length + 1` valid items whose
    next `length - 1` items are valid too (it never runs past the newest item into the oldest)
    and follows one env, drawn uniformly. Windows may cross episode boundaries: each step's
    `terminated` and `truncated` say where (`kl_rl.returns.n_step_targets` stops there).

    Args:
      key: PRNG key.
      state: a buffer of items with leaves [num_envs, ...], holding at least `length` items.
      batch_size: number of windows (static).
      length: steps per window (static).

    Returns:
      A pytree like one env's items with leading axes [batch_size, length].
    """
    start_key, env_key = jax.random.split(key)
    num_envs = jax.tree.leaves(state.data)[0].shape[1]
    start = jax.random.randint(start_key, (batch_size,), 0, jnp.maximum(state.size - length + 1, 1))
    env = jax.random.randint(env_key, (batch_size,), 0, num_envs)
    # Chronological position p of the valid items is slot (insert_pos - size + p) % capacity.
    slot = (state.insert_pos - state.size + start[:, None] + jnp.arange(length)) % state.capacity
    return jax.tree.map(lambda x: x[slot, env[:, None]], state.data)
