"""The replay buffer and GAE / discounted returns on hand-computed cases."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kl_rl import buffer, kl


def _items(start, k):
    return {"x": jnp.arange(start, start + k, dtype=jnp.float32), "y": {"z": jnp.arange(start, start + k)[:, None] * jnp.ones((1, 2), jnp.int32)}}


def test_circular_overwrite_size_and_order():
    state = buffer.init(4, {"x": jnp.zeros(()), "y": {"z": jnp.zeros(2, jnp.int32)}})
    assert state.capacity == 4 and int(state.size) == 0
    for i in range(6):
        state = buffer.add(state, jax.tree.map(lambda a: a[0], _items(i, 1)))
        assert int(state.size) == min(i + 1, 4)
    np.testing.assert_array_equal(buffer.ordered(state)["x"], [2, 3, 4, 5])
    np.testing.assert_array_equal(buffer.ordered(state)["y"]["z"][:, 0], [2, 3, 4, 5])


def test_add_batch_wraps_across_the_end():
    state = buffer.init(5, {"x": jnp.zeros(()), "y": {"z": jnp.zeros(2, jnp.int32)}})
    state = buffer.add_batch(state, _items(0, 3))
    state = buffer.add_batch(state, _items(3, 4))  # 3, 4 fill the end; 5, 6 overwrite 0, 1
    assert int(state.insert_pos) == 2 and int(state.size) == 5
    np.testing.assert_array_equal(state.data["x"], [5, 6, 2, 3, 4])
    np.testing.assert_array_equal(buffer.ordered(state)["x"], [2, 3, 4, 5, 6])
    state = buffer.add_batch(state, _items(7, 5))  # a full-capacity batch from insert_pos 2
    np.testing.assert_array_equal(buffer.ordered(state)["x"], [7, 8, 9, 10, 11])
    with pytest.raises(ValueError, match="exceeds"):
        buffer.add_batch(state, _items(0, 6))


def test_sample_only_returns_valid_items():
    state = buffer.init(100, {"x": jnp.zeros(()), "y": {"z": jnp.zeros(2, jnp.int32)}})
    state = buffer.add_batch(state, _items(1, 30))
    got = np.asarray(buffer.sample(jax.random.key(0), state, 5000)["x"])
    assert got.min() >= 1 and got.max() <= 30 and len(np.unique(got)) == 30
    state = buffer.add_batch(state, _items(31, 90))  # wraps: valid items are 21..120
    got = np.asarray(buffer.sample(jax.random.key(1), state, 5000)["x"])
    assert got.min() >= 21 and got.max() <= 120


class Step(NamedTuple):
    obs: jax.Array
    dist: kl.Categorical


def test_distributions_in_items_and_jit_vmap():
    example = Step(jnp.zeros(3), kl.Categorical(jnp.zeros(2)))
    init = jax.jit(lambda: buffer.init(8, example))
    states = jax.vmap(lambda _: init())(jnp.arange(3))
    items = Step(jnp.ones((3, 4, 3)), kl.Categorical(jnp.ones((3, 4, 2))))
    states = jax.jit(jax.vmap(buffer.add_batch))(states, items)
    np.testing.assert_array_equal(states.size, [4, 4, 4])
    assert isinstance(states.data.dist, kl.Categorical) and states.data.dist.logits.shape == (3, 8, 2)


def _gae(r, v, v_next, term, trunc, gamma, lam):
    as_arrays = lambda *xs: [jnp.asarray(x, jnp.float32) for x in xs]  # noqa: E731
    r, v, v_next = as_arrays(r, v, v_next)
    return buffer.gae(r, v, v_next, jnp.asarray(term), jnp.asarray(trunc), gamma, lam)


def test_gae_termination_does_not_bootstrap():
    # t=1 terminates; gamma 0.9, lambda 0.5.
    r, v, v_next = [1.0, 2.0, 3.0], [0.5, 1.0, 1.5], [1.0, 99.0, 2.0]
    adv, ret = _gae(r, v, v_next, [False, True, False], [False, False, False], 0.9, 0.5)
    d2 = 3.0 + 0.9 * 2.0 - 1.5  # last step bootstraps from v_next
    d1 = 2.0 - 1.0  # terminal: no bootstrap from 99
    d0 = 1.0 + 0.9 * 1.0 - 0.5
    np.testing.assert_allclose(adv, [d0 + 0.45 * d1, d1, d2], rtol=1e-6)
    np.testing.assert_allclose(ret, np.asarray(adv) + np.array(v), rtol=1e-6)


def test_gae_truncation_bootstraps_without_leaking_across_the_boundary():
    r, v, v_next = [1.0, 2.0, 3.0], [0.5, 1.0, 1.5], [1.0, 4.0, 2.0]
    adv, _ = _gae(r, v, v_next, [False, False, False], [False, True, False], 0.9, 0.5)
    d2 = 3.0 + 0.9 * 2.0 - 1.5
    d1 = 2.0 + 0.9 * 4.0 - 1.0  # truncated: bootstrap from the final observation's value
    d0 = 1.0 + 0.9 * 1.0 - 0.5
    np.testing.assert_allclose(adv, [d0 + 0.45 * d1, d1, d2], rtol=1e-6)  # A_1 has no d2 in it


def test_gae_lambda_limits_and_batching():
    rng = np.random.default_rng(0)
    T, B = 7, 3
    r, v, v_next = rng.normal(size=(3, T, B)).astype(np.float32)
    term = rng.random((T, B)) < 0.2
    trunc = (rng.random((T, B)) < 0.2) & ~term
    # As in a real rollout: the next observation's value is the next step's value unless the
    # episode ended (then it is the final observation's, or irrelevant on termination).
    v_next[:-1] = np.where(term[:-1] | trunc[:-1], v_next[:-1], v[1:])
    adv1, ret1 = _gae(r, v, v_next, term, trunc, 0.95, 1.0)
    g = buffer.discounted_returns(jnp.asarray(r), jnp.asarray(v_next), jnp.asarray(term), jnp.asarray(trunc), 0.95)
    np.testing.assert_allclose(adv1, np.asarray(g) - v, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret1, g, rtol=1e-5, atol=1e-5)
    adv0, _ = _gae(r, v, v_next, term, trunc, 0.95, 0.0)
    np.testing.assert_allclose(adv0, r + 0.95 * (1 - term) * v_next - v, rtol=1e-5, atol=1e-6)
    for b in range(B):
        col, _ = _gae(r[:, b], v[:, b], v_next[:, b], term[:, b], trunc[:, b], 0.95, 0.7)
        full, _ = _gae(r, v, v_next, term, trunc, 0.95, 0.7)
        np.testing.assert_allclose(col, np.asarray(full)[:, b], rtol=1e-6)


def test_discounted_returns_by_hand():
    r = jnp.array([1.0, 1.0, 1.0, 1.0, 1.0])
    v_next = jnp.array([0.0, 10.0, 0.0, 0.0, 20.0])
    term = jnp.array([False, False, True, False, False])
    trunc = jnp.array([False, True, False, False, False])
    g = buffer.discounted_returns(r, v_next, term, trunc, 0.5)
    # t4: 1 + 0.5 * 20 (rollout end); t3: 1 + 0.5 * 11; t2 terminal: 1; t1 truncated: 1 + 0.5 * 10; t0: 1 + 0.5 * 6
    np.testing.assert_allclose(g, [4.0, 6.0, 1.0, 6.5, 11.0])
