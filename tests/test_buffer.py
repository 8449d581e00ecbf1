"""The replay buffer, and GAE / discounted returns on hand-computed cases."""

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


def _gae(r, v, v_next, term, trunc, gamma, lam):
    return buffer.gae(
        jnp.asarray(r, jnp.float32), jnp.asarray(v, jnp.float32), jnp.asarray(v_next, jnp.float32),
        jnp.asarray(term), jnp.asarray(trunc), gamma, lam,
    )


def test_gae_by_hand_termination_truncation_and_rollout_end():
    # gamma 0.9, lambda 0.5. t=1 terminates, t=2 is truncated, t=3 is cut by the rollout's end.
    r, v, v_next = [1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 1.5, 2.0], [1.0, 99.0, 5.0, 3.0]
    term, trunc = [False, True, False, False], [False, False, True, False]
    adv, ret = _gae(r, v, v_next, term, trunc, 0.9, 0.5)
    # d3 = 4 + 0.9 * 3 - 2 = 4.7: the rollout's last step bootstraps from v_tp1.
    # d2 = 3 + 0.9 * 5 - 1.5 = 6.0: truncation bootstraps from the final observation's value,
    #      and A_2 = d2 takes nothing from the next episode's A_3.
    # d1 = 2 - 1 = 1.0: termination ignores v_tp1 = 99.
    # d0 = 1 + 0.9 * 1 - 0.5 = 1.4, A_0 = 1.4 + 0.45 * 1.0.
    np.testing.assert_allclose(adv, [1.85, 1.0, 6.0, 4.7], rtol=1e-6)
    np.testing.assert_allclose(ret, [2.35, 2.0, 7.5, 6.7], rtol=1e-6)


def test_gae_truncation_does_not_leak_across_the_boundary():
    r, v, v_next = [1.0, 2.0, 3.0], [0.5, 1.0, 1.5], [1.0, 4.0, 2.0]
    adv, _ = _gae(r, v, v_next, [False, False, False], [False, True, False], 0.9, 0.5)
    # Changing everything after the truncation leaves A_0 and A_1 alone.
    term2, trunc2 = [False, False, True], [False, True, False]
    adv2, _ = _gae([1.0, 2.0, -7.0], v, [1.0, 4.0, 50.0], term2, trunc2, 0.9, 0.5)
    np.testing.assert_allclose(adv[:2], adv2[:2], rtol=1e-6)
    np.testing.assert_allclose(adv[:2], [1.4 + 0.45 * 4.6, 4.6], rtol=1e-6)


def _random_rollout(T=7, B=3, seed=0):
    rng = np.random.default_rng(seed)
    r, v, v_next = rng.normal(size=(3, T, B)).astype(np.float32)
    term = rng.random((T, B)) < 0.2
    trunc = (rng.random((T, B)) < 0.2) & ~term
    # Columns 0 and 1 end the rollout on a termination and on a truncation.
    term[-1, :2], trunc[-1, :2] = [True, False], [False, True]
    # As in a real rollout: the next observation's value is the next step's value unless the
    # episode ended (then it is the final observation's, or irrelevant on termination).
    v_next[:-1] = np.where(term[:-1] | trunc[:-1], v_next[:-1], v[1:])
    return r, v, v_next, term, trunc


def test_gae_lambda_limits():
    r, v, v_next, term, trunc = _random_rollout()
    adv1, ret1 = _gae(r, v, v_next, term, trunc, 0.95, 1.0)
    g = buffer.discounted_returns(r, v_next, term, trunc, 0.95)
    np.testing.assert_allclose(adv1, np.asarray(g) - v, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret1, g, rtol=1e-5, atol=1e-5)
    adv0, ret0 = _gae(r, v, v_next, term, trunc, 0.95, 0.0)
    np.testing.assert_allclose(adv0, r + 0.95 * (1 - term) * v_next - v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret0, r + 0.95 * (1 - term) * v_next, rtol=1e-5, atol=1e-6)


def test_gae_batched_matches_columns_and_takes_traced_gamma_lambda():
    r, v, v_next, term, trunc = _random_rollout(T=9, B=4, seed=1)
    full, _ = _gae(r, v, v_next, term, trunc, 0.95, 0.7)
    for b in range(r.shape[1]):
        col, _ = _gae(r[:, b], v[:, b], v_next[:, b], term[:, b], trunc[:, b], 0.95, 0.7)
        np.testing.assert_allclose(col, np.asarray(full)[:, b], rtol=1e-6, atol=1e-6)
    sweep = jax.jit(jax.vmap(buffer.gae, in_axes=(None,) * 5 + (0, 0)))
    swept, _ = sweep(r, v, v_next, term, trunc, jnp.array([0.95, 0.99]), jnp.array([0.7, 1.0]))
    np.testing.assert_allclose(swept[0], full, rtol=1e-6, atol=1e-6)
    expected, _ = _gae(r, v, v_next, term, trunc, 0.99, 1.0)
    np.testing.assert_allclose(swept[1], expected, rtol=1e-6, atol=1e-6)


def test_discounted_returns_by_hand():
    r = jnp.array([1.0, 1.0, 1.0, 1.0, 1.0])
    v_next = jnp.array([0.0, 10.0, 0.0, 0.0, 20.0])
    term = jnp.array([False, False, True, False, False])
    trunc = jnp.array([False, True, False, False, False])
    g = buffer.discounted_returns(r, v_next, term, trunc, 0.5)
    # t4: 1 + 0.5 * 20 (rollout end); t3: 1 + 0.5 * 11; t2 terminal: 1; t1 truncated: 1 + 0.5 * 10;
    # t0: 1 + 0.5 * 6.
    np.testing.assert_allclose(g, [4.0, 6.0, 1.0, 6.5, 11.0])
    # A rollout that ends on a termination does not bootstrap from v_tp1 = 7.
    term, trunc = jnp.array([False, True]), jnp.array([False, False])
    g = buffer.discounted_returns(jnp.array([1.0, 1.0]), jnp.array([0.0, 7.0]), term, trunc, 0.5)
    np.testing.assert_allclose(g, [1.5, 1.0])


# --- V-trace (gae with log_rho_t) ---------------------------------------------------------


def _vtrace(r, v, v_next, term, trunc, gamma, lam, weights, rho_clip=1.0, c_clip=1.0):
    log_rho = jnp.log(jnp.asarray(weights, jnp.float32))
    return buffer.gae(
        jnp.asarray(r, jnp.float32), jnp.asarray(v, jnp.float32), jnp.asarray(v_next, jnp.float32),
        jnp.asarray(term), jnp.asarray(trunc), gamma, lam, log_rho_t=log_rho, rho_clip=rho_clip, c_clip=c_clip,
    )  # fmt: skip


def test_vtrace_by_hand():
    # Espeholt et al. 2018, eq. 1: v_s = V(x_s) + sum_t gamma^(t-s) (prod_{s<=i<t} c_i) rho_t delta_t,
    # c_i = lambda min(c_bar, w_i), rho_t = min(rho_bar, w_t), weights w = [2, 0.5, 1], bars 1.
    r, v, v_next = [1.0, 0.5, 2.0], [0.3, 0.8, -0.4], [0.8, -0.4, 1.5]
    no = [False, False, False]
    d0 = 1.0 + 0.9 * 0.8 - 0.3  # 1.42
    d1 = 0.5 + 0.9 * -0.4 - 0.8  # -0.66
    d2 = 2.0 + 0.9 * 1.5 - -0.4  # 3.75: the rollout's last step bootstraps from v_tp1
    rho = [1.0, 0.5, 1.0]  # min(1, w)
    for lam in (1.0, 0.5):
        c = [lam * 1.0, lam * 0.5, lam * 1.0]  # lambda min(1, w)
        v2 = -0.4 + rho[2] * d2
        v1 = 0.8 + rho[1] * d1 + 0.9 * c[1] * rho[2] * d2
        v0 = 0.3 + rho[0] * d0 + 0.9 * c[0] * rho[1] * d1 + 0.9**2 * c[0] * c[1] * rho[2] * d2
        adv, ret = _vtrace(r, v, v_next, no, no, 0.9, lam, [2.0, 0.5, 1.0])
        np.testing.assert_allclose(ret, [v0, v1, v2], rtol=1e-6, atol=1e-6, err_msg=f"lambda {lam}")
        expected_adv = [v0 - 0.3, v1 - 0.8, v2 + 0.4]
        np.testing.assert_allclose(adv, expected_adv, rtol=1e-6, atol=1e-6, err_msg=f"lambda {lam}")
    # The same numbers, summed out: lambda 1 gives v0 = 0.3 + 1.42 + 0.9 * 0.5 * -0.66 + 0.81 * 0.5 * 3.75,
    # lambda 0.5 gives v0 = 0.3 + 1.42 + 0.9 * 0.5 * 0.5 * -0.66 + 0.81 * 0.5 * 0.25 * 3.75.
    for lam, v0 in ((1.0, 2.94175), (0.5, 1.9511875)):
        _, ret = _vtrace(r, v, v_next, no, no, 0.9, lam, [2.0, 0.5, 1.0])
        assert float(ret[0]) == pytest.approx(v0, rel=1e-6)


def test_vtrace_with_unit_weights_is_gae_bit_for_bit():
    r, v, v_next, term, trunc = _random_rollout(T=7, B=3, seed=2)
    assert term.any() and trunc.any()
    for gamma, lam in ((0.99, 0.95), (0.9, 1.0)):
        expected = _gae(r, v, v_next, term, trunc, gamma, lam)
        got = _vtrace(r, v, v_next, term, trunc, gamma, lam, np.ones_like(r))  # log w = 0 exactly
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)
    # Not vacuous: weights below 1 do change the result.
    halves, _ = _vtrace(r, v, v_next, term, trunc, 0.99, 0.95, np.full_like(r, 0.5))
    assert np.max(np.abs(np.asarray(halves) - np.asarray(expected[0]))) > 0.1


def test_vtrace_termination_cuts_the_trace_and_truncation_bootstraps():
    # gamma 0.9, lambda 1. t=1 terminates, t=2 is truncated, t=3 is cut by the rollout's end.
    r, v, v_next = [1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 1.5, 2.0], [1.0, 99.0, 5.0, 3.0]
    term, trunc = [False, True, False, False], [False, False, True, False]
    w = [0.5, 2.0, 0.8, 1.5]  # rho = c = min(1, w) = [0.5, 1, 0.8, 1]
    adv, ret = _vtrace(r, v, v_next, term, trunc, 0.9, 1.0, w)
    d0 = 1.0 + 0.9 * 1.0 - 0.5  # 1.4
    d1 = 2.0 - 1.0  # terminated: no bootstrap from v_tp1 = 99
    d2 = 3.0 + 0.9 * 5.0 - 1.5  # truncated: bootstraps from the final observation's value
    d3 = 4.0 + 0.9 * 3.0 - 2.0  # rollout end: bootstraps from v_tp1
    expected = [
        0.5 * d0 + 0.9 * 0.5 * 1.0 * d1,  # the trace stops at the terminated step
        1.0 * d1,  # nothing from the next episode
        0.8 * d2,  # nothing from the next episode
        1.0 * d3,
    ]
    np.testing.assert_allclose(adv, expected, rtol=1e-6)
    np.testing.assert_allclose(ret, np.add(expected, v), rtol=1e-6)
    # Everything past the terminated step, and v_tp1 there, leaves A_0 and A_1 alone.
    adv2, _ = _vtrace([1.0, 2.0, -7.0, 0.0], v, [1.0, -1e3, 50.0, 8.0], term, trunc, 0.9, 1.0, [0.5, 2.0, 3.0, 0.1])
    np.testing.assert_array_equal(adv2[:2], adv[:2])


def test_vtrace_rho_clip_above_the_weight_lets_it_through():
    # T = 2, weights [2, 2], gamma 0.5, lambda 1: d0 = 1 + 0.5 * 2 - 1 = 1, d1 = 3 + 0.5 * 4 - 2 = 3.
    r, v, v_next, no = [1.0, 3.0], [1.0, 2.0], [2.0, 4.0], [False, False]
    cases = {
        # (rho_clip, c_clip): [rho_0 d0 + gamma c_0 rho_1 d1, rho_1 d1]
        (5.0, 1.0): [2.0 * 1.0 + 0.5 * 1.0 * 2.0 * 3.0, 2.0 * 3.0],  # rho = w = 2, c = 1
        (5.0, 5.0): [2.0 * 1.0 + 0.5 * 2.0 * 2.0 * 3.0, 2.0 * 3.0],  # c = w = 2 too
        (1.0, 5.0): [1.0 * 1.0 + 0.5 * 2.0 * 1.0 * 3.0, 1.0 * 3.0],  # rho clipped, c not
        (1.5, 1.0): [1.5 * 1.0 + 0.5 * 1.0 * 1.5 * 3.0, 1.5 * 3.0],  # rho clipped at 1.5
    }
    for (rho_clip, c_clip), expected in cases.items():
        adv, _ = _vtrace(r, v, v_next, no, no, 0.5, 1.0, [2.0, 2.0], rho_clip, c_clip)
        np.testing.assert_allclose(adv, expected, rtol=1e-6, err_msg=f"{rho_clip} {c_clip}")
