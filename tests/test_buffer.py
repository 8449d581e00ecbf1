"""The replay buffer: adds, wrap-around, ordered reads, uniform samples, vmapped buffers."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kl_rl import buffer

EXAMPLE = {
    "x": jax.ShapeDtypeStruct((), jnp.float32),
    "y": {"z": jax.ShapeDtypeStruct((2,), jnp.int32)},
}


def _items(start, k):
    """k items numbered start, start + 1, ...: x = n, y.z = [n, n]."""
    n = jnp.arange(start, start + k)
    return {"x": n.astype(jnp.float32), "y": {"z": jnp.stack([n, n], axis=1).astype(jnp.int32)}}


def test_circular_overwrite_size_and_order():
    state = buffer.init(4, EXAMPLE)
    assert state.capacity == 4 and int(state.size) == 0 and int(state.insert_pos) == 0
    assert state.data["y"]["z"].shape == (4, 2) and state.data["y"]["z"].dtype == jnp.int32
    for i in range(6):
        state = buffer.add(state, jax.tree.map(lambda a: a[0], _items(i, 1)))
        assert int(state.size) == min(i + 1, 4) and int(state.insert_pos) == (i + 1) % 4
    np.testing.assert_array_equal(state.data["x"], [4, 5, 2, 3])  # 4 and 5 overwrote 0 and 1
    np.testing.assert_array_equal(buffer.ordered(state)["x"], [2, 3, 4, 5])
    np.testing.assert_array_equal(buffer.ordered(state)["y"]["z"], [[2, 2], [3, 3], [4, 4], [5, 5]])


def test_add_batch_wraps_across_the_end():
    state = buffer.init(5, EXAMPLE)
    state = buffer.add_batch(state, _items(0, 3))
    assert int(state.insert_pos) == 3 and int(state.size) == 3
    state = buffer.add_batch(state, _items(3, 4))  # 3, 4 fill the end; 5, 6 overwrite 0, 1
    assert int(state.insert_pos) == 2 and int(state.size) == 5
    np.testing.assert_array_equal(state.data["x"], [5, 6, 2, 3, 4])
    np.testing.assert_array_equal(state.data["y"]["z"][:, 1], [5, 6, 2, 3, 4])
    np.testing.assert_array_equal(buffer.ordered(state)["x"], [2, 3, 4, 5, 6])
    state = buffer.add_batch(state, _items(7, 5))  # a full-capacity batch from insert_pos 2
    np.testing.assert_array_equal(buffer.ordered(state)["x"], [7, 8, 9, 10, 11])
    state = buffer.add(state, jax.tree.map(lambda a: a[0], _items(12, 1)))  # overwrites 7
    np.testing.assert_array_equal(buffer.ordered(state)["x"], [8, 9, 10, 11, 12])
    with pytest.raises(ValueError, match="exceeds"):
        buffer.add_batch(state, _items(0, 6))
    with pytest.raises(ValueError, match="shape"):
        buffer.add_batch(state, {"x": jnp.zeros((5, 3)), "y": {"z": jnp.zeros((5, 2), jnp.int32)}})
    full = buffer.add_batch(state, {"x": jnp.arange(5), "y": {"z": jnp.zeros((5, 2))}})
    assert full.data["x"].dtype == jnp.float32 and full.data["y"]["z"].dtype == jnp.int32


def test_full_capacity_add_batch_is_free():
    state = buffer.init(8, {"o": jax.ShapeDtypeStruct((3, 2), jnp.float32)})
    state = buffer.add(state, {"o": jnp.ones((3, 2))})  # insert_pos 1: must not matter
    rollout = {"o": jnp.arange(48.0).reshape(8, 3, 2)}
    full = buffer.add_batch(state, rollout)
    assert full.data["o"] is rollout["o"] and int(full.insert_pos) == 0 and int(full.size) == 8
    # In one jit, the write and the chronological read fold to nothing: no scatter, no roll.
    write_then_read = jax.jit(lambda s, r: buffer.ordered(buffer.add_batch(s, r)))
    hlo = write_then_read.lower(state, rollout).compile().as_text()
    for op in ("scatter", "gather", "dynamic-slice", "dynamic-update-slice", "concatenate"):
        assert op not in hlo
    np.testing.assert_array_equal(write_then_read(state, rollout)["o"], rollout["o"])


def test_sample_only_returns_valid_items():
    empty = buffer.init(100, EXAMPLE)
    assert float(buffer.sample(jax.random.key(0), empty, 4)["x"].sum()) == 0.0
    state = buffer.add_batch(empty, _items(1, 50))  # half full
    got = buffer.sample(jax.random.key(1), state, 5000)
    np.testing.assert_array_equal(got["y"]["z"][:, 0], got["x"])  # an item's leaves stay together
    counts = np.bincount(np.asarray(got["x"], np.int64), minlength=51)
    assert counts[0] == 0 and counts[1:].min() >= 60 and counts[1:].max() <= 145  # ~100 each
    state = buffer.add_batch(state, _items(51, 70))  # wraps: the valid items are 21..120
    got = np.asarray(buffer.sample(jax.random.key(2), state, 5000)["x"])
    assert got.min() == 21 and got.max() == 120 and len(np.unique(got)) == 100
    a, b = buffer.sample(jax.random.key(3), state, 8), buffer.sample(jax.random.key(3), state, 8)
    np.testing.assert_array_equal(a["x"], b["x"])


class DiagGaussian(NamedTuple):
    mean: jax.Array
    log_std: jax.Array


def test_transition_items_under_jit_and_vmap_over_buffers():
    example = buffer.Transition(
        obs=jax.ShapeDtypeStruct((2, 3), jnp.float32),  # 2 envs
        action=jax.ShapeDtypeStruct((2, 1), jnp.float32),
        reward=jax.ShapeDtypeStruct((2,), jnp.float32),
        terminated=jax.ShapeDtypeStruct((2,), jnp.bool_),
        truncated=jax.ShapeDtypeStruct((2,), jnp.bool_),
        next_obs=jax.ShapeDtypeStruct((2, 3), jnp.float32),
        value=jax.ShapeDtypeStruct((2,), jnp.float32),
        log_prob=jax.ShapeDtypeStruct((2,), jnp.float32),
        dist={"pi": DiagGaussian(*[jax.ShapeDtypeStruct((2, 1), jnp.float32)] * 2)},
    )
    num_buffers, k = 3, 6
    states = jax.vmap(lambda _: buffer.init(4, example))(jnp.arange(num_buffers))
    # Buffer b, step t holds the number 100 b + t in every leaf.
    stamp = 100 * jnp.arange(num_buffers)[:, None] + jnp.arange(k)[None, :]

    def fill(leaf):
        # leaf: [buffers, capacity, ...]
        value = stamp.reshape(stamp.shape + (1,) * (leaf.ndim - 2))
        return jnp.broadcast_to(value, (num_buffers, k, *leaf.shape[2:])).astype(leaf.dtype)

    items = jax.tree.map(fill, states.data)
    first, rest = jax.tree.map(lambda x: x[:, :3], items), jax.tree.map(lambda x: x[:, 3:], items)
    add_batch = jax.jit(jax.vmap(buffer.add_batch))
    states = add_batch(add_batch(states, first), rest)  # 6 steps into capacity 4: wraps
    assert isinstance(states.data, buffer.Transition)
    assert isinstance(states.data.dist["pi"], DiagGaussian)
    assert states.data.dist["pi"].log_std.shape == (num_buffers, 4, 2, 1)
    assert states.data.terminated.dtype == jnp.bool_
    np.testing.assert_array_equal(states.size, [4, 4, 4])
    np.testing.assert_array_equal(states.insert_pos, [2, 2, 2])
    chronological = jax.jit(jax.vmap(buffer.ordered))(states)
    np.testing.assert_array_equal(chronological.dist["pi"].mean[:, :, 0, 0], stamp[:, 2:])
    np.testing.assert_array_equal(chronological.obs[:, :, 1, 2], stamp[:, 2:])
    keys = jax.random.split(jax.random.key(0), num_buffers)
    sample = jax.jit(jax.vmap(buffer.sample, in_axes=(0, 0, None)), static_argnums=2)
    drawn = sample(keys, states, 50)
    assert drawn.value.shape == (num_buffers, 50, 2)
    for b in range(num_buffers):
        valid = {100.0 * b + t for t in range(2, 6)}
        assert set(np.asarray(drawn.reward[b, :, 0]).tolist()) <= valid


def _time_major(start, k, num_envs=3):
    """k items of a vectorized env: item t holds x = 10 t + e for env e."""
    t = jnp.arange(start, start + k)[:, None]
    return {"x": (10 * t + jnp.arange(num_envs)).astype(jnp.float32)}


def test_sample_windows_are_consecutive_valid_steps_of_one_env():
    example = {"x": jax.ShapeDtypeStruct((3,), jnp.float32)}
    state = buffer.add_batch(buffer.init(8, example), _time_major(0, 6))
    state = buffer.add_batch(state, _time_major(6, 5))  # wraps: the valid items are t = 3..10
    got = np.asarray(buffer.sample_windows(jax.random.key(0), state, 6000, 3)["x"]).astype(np.int64)
    assert got.shape == (6000, 3)
    t, env = got // 10, got % 10
    np.testing.assert_array_equal(np.diff(t, axis=1), 1)  # consecutive: never across the newest item
    assert np.all(env == env[:, :1])  # one env per window
    # Starts 3..8 (the window's last step at most 10) and envs 0..2, each uniform: 1000 and 2000 expected.
    starts = np.bincount(t[:, 0], minlength=11)
    assert starts[:3].sum() == 0 and starts[9:].sum() == 0
    assert starts[3:9].min() >= 880 and starts[3:9].max() <= 1120
    envs = np.bincount(env[:, 0])
    assert envs.min() >= 1850 and envs.max() <= 2150


def test_replay_persists_across_updates_up_to_its_capacity():
    # The loop's off-policy replay (RolloutSpec.replay_capacity): a rollout of T = 4 steps is added
    # each update to a buffer of 10 items, which keeps the newest 10 steps.
    example = {"x": jax.ShapeDtypeStruct((3,), jnp.float32)}
    state = buffer.init(10, example)
    for update in range(4):
        state = buffer.add_batch(state, _time_major(4 * update, 4))
        assert int(state.size) == min(4 * (update + 1), 10)
    np.testing.assert_array_equal(buffer.ordered(state)["x"][:, 0], 10 * np.arange(6, 16))
