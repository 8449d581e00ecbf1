"""The one replay buffer, and returns/advantages that bootstrap on truncation only.

A functional, jittable, fixed-capacity circular buffer over any pytree. In on-policy use an item
is one time step of a vectorized env (leaves [num_envs, ...]), so the data are time-major
[capacity, num_envs, ...]: a rollout of T steps is `add_batch`ed into a buffer of capacity T and
read back in order with `ordered`. Each `Transition` records the behaviour policy's distribution,
so any update can compute exact KL and importance ratios to the policy that collected the data.

Why not flashbax (0.1.3 works with jax 0.10): its buffers are built for off-policy sampling of
trajectory windows (uniform or prioritised) and it pulls in tensorstore; kl_rl's main use is a
time-major rollout container that GAE scans in order and that checkpoints as a plain pytree. The
few functions below cover that and uniform sampling without adding a dependency.
"""

from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


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


def gae(
    r_t: ArrayLike,
    v_t: ArrayLike,
    v_tp1: ArrayLike,
    terminated_t: ArrayLike,
    truncated_t: ArrayLike,
    gamma: ArrayLike,
    lambda_: ArrayLike,
    log_rho_t: ArrayLike | None = None,
    rho_clip: ArrayLike = 1.0,
    c_clip: ArrayLike = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimation (Schulman et al. 2016, arXiv:1506.02438), time-major.

    delta_t = r_t + gamma (1 - terminated_t) v_tp1_t - v_t, where v_tp1_t is the value of
    transition t's true next observation, so a truncated step bootstraps and a terminated one does
    not. A_t = delta_t + gamma lambda (1 - done_t) A_{t+1} with done = terminated | truncated, so
    no advantage leaks across an episode boundary, and A_T = 0 past the rollout (its last step
    still bootstraps through delta).

    With `log_rho_t`, the log importance weights log pi(a_t|s_t) - log mu(a_t|s_t) of a target
    policy pi against the behaviour policy mu that collected the data, this is V-trace
    (Espeholt et al. 2018, eq. 1, with its lambda): A_t = rho_t delta_t + gamma lambda c_t
    (1 - done_t) A_{t+1}, rho_t = min(rho_clip, w_t), c_t = min(c_clip, w_t), and the returns
    v_t + A_t are the V-trace targets v_s. With every weight 1 it is GAE exactly.

    Args:
      r_t: rewards [T, ...].
      v_t: V(obs_t) [T, ...].
      v_tp1: V(next_obs_t) [T, ...].
      terminated_t: bool [T, ...].
      truncated_t: bool [T, ...].
      gamma: discount, may be traced.
      lambda_: GAE lambda, may be traced.
      log_rho_t: optional log importance weights [T, ...] (V-trace).
      rho_clip: rho-bar, the truncation of the weight on each TD error (V-trace).
      c_clip: c-bar, the truncation of the weights that carry the trace (V-trace).

    Returns:
      (advantages, returns), each [T, ...], with returns = advantages + v_t.
    """
    r_t, v_t, v_tp1 = jnp.asarray(r_t), jnp.asarray(v_t), jnp.asarray(v_tp1)
    not_terminated = 1.0 - jnp.asarray(terminated_t).astype(r_t.dtype)
    not_done = 1.0 - jnp.logical_or(terminated_t, truncated_t).astype(r_t.dtype)
    delta_t = r_t + gamma * not_terminated * v_tp1 - v_t
    if log_rho_t is None:
        trace_t = not_done
    else:
        w_t = jnp.exp(jnp.minimum(jnp.asarray(log_rho_t), 30.0))  # finite for any weight
        delta_t = jnp.minimum(rho_clip, w_t) * delta_t
        trace_t = jnp.minimum(c_clip, w_t) * not_done

    def step(a_tp1, xs):
        delta, trace = xs
        a_t = delta + gamma * lambda_ * trace * a_tp1
        return a_t, a_t

    a_end = jnp.zeros_like(delta_t[0])
    _, advantages = jax.lax.scan(step, a_end, (delta_t, trace_t), reverse=True)
    return advantages, advantages + v_t


def discounted_returns(
    r_t: ArrayLike,
    v_tp1: ArrayLike,
    terminated_t: ArrayLike,
    truncated_t: ArrayLike,
    gamma: ArrayLike,
) -> jax.Array:
    """Discounted returns that bootstrap on truncation and at the rollout's end, time-major.

    G_t = r_t + gamma (1 - terminated_t) * (v_tp1_t if done_t or t == T - 1 else G_{t+1}), with
    done = terminated | truncated: never bootstraps past a true terminal state.

    Args:
      r_t: rewards [T, ...].
      v_tp1: V(next_obs_t) [T, ...], the value of each transition's true next observation.
      terminated_t: bool [T, ...].
      truncated_t: bool [T, ...].
      gamma: discount, may be traced.

    Returns:
      G_t [T, ...].
    """
    r_t, v_tp1 = jnp.asarray(r_t), jnp.asarray(v_tp1)
    not_terminated = 1.0 - jnp.asarray(terminated_t).astype(r_t.dtype)
    done = jnp.logical_or(terminated_t, truncated_t)

    def step(g_tp1, xs):
        r, v_next, not_term, done = xs
        g_t = r + gamma * not_term * jnp.where(done, v_next, g_tp1)
        return g_t, g_t

    # Seeding the carry with v_tp1[-1] makes the last step bootstrap whether or not it is done.
    _, returns = jax.lax.scan(step, v_tp1[-1], (r_t, v_tp1, not_terminated, done), reverse=True)
    return returns
