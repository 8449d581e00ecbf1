"""Returns and advantages (kl_rl.returns): GAE, V-trace, discounted returns and token GAE on
hand-computed cases, their limits and their batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax

from kl_rl import returns


def _gae(r, v, v_next, term, trunc, gamma, lam):
    return returns.gae(
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
    g = returns.discounted_returns(r, v_next, term, trunc, 0.95)
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
    sweep = jax.jit(jax.vmap(returns.gae, in_axes=(None,) * 5 + (0, 0)))
    swept, _ = sweep(r, v, v_next, term, trunc, jnp.array([0.95, 0.99]), jnp.array([0.7, 1.0]))
    np.testing.assert_allclose(swept[0], full, rtol=1e-6, atol=1e-6)
    expected, _ = _gae(r, v, v_next, term, trunc, 0.99, 1.0)
    np.testing.assert_allclose(swept[1], expected, rtol=1e-6, atol=1e-6)


def test_discounted_returns_by_hand():
    r = jnp.array([1.0, 1.0, 1.0, 1.0, 1.0])
    v_next = jnp.array([0.0, 10.0, 0.0, 0.0, 20.0])
    term = jnp.array([False, False, True, False, False])
    trunc = jnp.array([False, True, False, False, False])
    g = returns.discounted_returns(r, v_next, term, trunc, 0.5)
    # t4: 1 + 0.5 * 20 (rollout end); t3: 1 + 0.5 * 11; t2 terminal: 1; t1 truncated: 1 + 0.5 * 10;
    # t0: 1 + 0.5 * 6.
    np.testing.assert_allclose(g, [4.0, 6.0, 1.0, 6.5, 11.0])
    # A rollout that ends on a termination does not bootstrap from v_tp1 = 7.
    term, trunc = jnp.array([False, True]), jnp.array([False, False])
    g = returns.discounted_returns(jnp.array([1.0, 1.0]), jnp.array([0.0, 7.0]), term, trunc, 0.5)
    np.testing.assert_allclose(g, [1.5, 1.0])


# --- V-trace ---------------------------------------------------------------------------------


def _vtrace(r, v, v_next, term, trunc, gamma, lam, weights, rho_clip=1.0, c_clip=1.0):
    log_rho = jnp.log(jnp.asarray(weights, jnp.float32))
    return returns.vtrace(
        jnp.asarray(r, jnp.float32), jnp.asarray(v, jnp.float32), jnp.asarray(v_next, jnp.float32),
        jnp.asarray(term), jnp.asarray(trunc), log_rho, gamma, lam, rho_clip, c_clip,
    )


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


# --- token GAE ---------------------------------------------------------------------------------


def test_token_gae_by_hand_with_gamma_one():
    """One response of three tokens (terminal at its last one) in a buffer of four, time-major [T, 1]."""
    r_t = jnp.asarray([[0.0, 0.0, 1.0, 0.0]]).T
    v_t = jnp.asarray([[0.5, 0.6, 0.7, 9.0]]).T  # the value past the end must not be read
    mask_t = jnp.asarray([[1.0, 1.0, 1.0, 0.0]]).T
    adv, ret = returns.token_gae(r_t, v_t, mask_t, 1.0, 1.0)
    # lambda 1: the advantage is the return (1 at every token) minus the value.
    np.testing.assert_allclose(adv[:, 0], [0.5, 0.4, 0.3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(ret[:3, 0], [1.0, 1.0, 1.0], rtol=1e-6)
    # lambda 0.5: deltas (0.1, 0.1, 0.3), accumulated backwards with weight 0.5.
    adv, ret = returns.token_gae(r_t, v_t, mask_t, 1.0, 0.5)
    np.testing.assert_allclose(adv[:, 0], [0.1 + 0.5 * (0.1 + 0.5 * 0.3), 0.1 + 0.5 * 0.3, 0.3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(ret[:3], adv[:3] + v_t[:3], rtol=1e-6)


def test_token_gae_is_gae_of_episodes_that_end_at_the_last_token():
    """Responses of different lengths (columns), gamma < 1: inside each response, token_gae is
    `gae` with a termination at its last token; past it, 0."""
    r, v, _, _, _ = _random_rollout(T=6, B=3, seed=3)
    lengths = np.array([6, 4, 1])
    mask = (np.arange(6)[:, None] < lengths[None, :]).astype(np.float32)
    adv, ret = returns.token_gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(mask), 0.9, 0.8)
    for b, n in enumerate(lengths):
        terminated = np.arange(n) == n - 1
        v_next = np.append(v[1:n, b], 0.0)
        want_adv, want_ret = _gae(r[:n, b], v[:n, b], v_next, terminated, np.zeros(n, bool), 0.9, 0.8)
        np.testing.assert_allclose(adv[:n, b], want_adv, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ret[:n, b], want_ret, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(adv[n:, b], 0.0)


def test_n_step_targets_by_hand_termination_truncation_and_window_end():
    # gamma 0.5, windows of 3 steps (columns). Column 0: no episode ends, bootstrap after step 2.
    # Column 1: step 1 terminates: no bootstrap, step 2 (the next episode) ignored.
    # Column 2: step 1 is truncated: bootstrap from step 1's next observation.
    r = jnp.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [4.0, 4.0, 4.0]])
    term = jnp.array([[False, False, False], [False, True, False], [False, False, False]])
    trunc = jnp.array([[False, False, False], [False, False, True], [False, False, False]])
    partial, last, discount = returns.n_step_targets(r, term, trunc, 0.5)
    np.testing.assert_allclose(partial, [1 + 0.5 * 2 + 0.25 * 4, 1 + 0.5 * 2, 1 + 0.5 * 2])
    np.testing.assert_array_equal(last, [2, 1, 1])
    np.testing.assert_allclose(discount, [0.125, 0.0, 0.25])


def test_n_step_targets_agree_with_discounted_returns_over_the_window():
    rng = np.random.default_rng(0)
    n, b = 5, 400
    r = rng.normal(size=(n, b)).astype(np.float32)
    v_tp1 = rng.normal(size=(n, b)).astype(np.float32)
    term, trunc = rng.random((n, b)) < 0.15, rng.random((n, b)) < 0.15
    partial, last, discount = returns.n_step_targets(r, term, trunc, 0.9)
    got = partial + discount * v_tp1[np.asarray(last), np.arange(b)]
    expected = returns.discounted_returns(r, v_tp1, term, trunc, 0.9)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.any(term[:-1] & ~trunc[:-1]) and np.any(trunc[:-1] & ~term[:-1])  # both kinds of end occur


def _window(n=6, b=300, seed=0, dones=True):
    """A random replayed window, time-major: Q'(s_j, a_j), V'(s'_j), rewards, ends, log weights
    spread on both sides of 1."""
    rng = np.random.default_rng(seed)
    q, v_tp1, r = rng.normal(size=(3, n, b)).astype(np.float32)
    log_rho = rng.normal(scale=1.0, size=(n, b)).astype(np.float32)
    term = rng.random((n, b)) < (0.15 if dones else 0.0)
    trunc = (rng.random((n, b)) < (0.15 if dones else 0.0)) & ~term
    return q, v_tp1, r, term, trunc, log_rho


def _retrace_loop(q, v_tp1, r, term, trunc, log_rho, gamma, lam):
    """Q_ret(s_0, a_0) straight from the formula, one window at a time."""
    n, b = r.shape
    out = np.zeros(b)
    for k in range(b):
        target, coef = float(q[0, k]), 1.0
        for j in range(n):
            if j > 0:
                coef *= gamma * lam * min(1.0, float(np.exp(log_rho[j, k])))
            target += coef * (r[j, k] + gamma * (1.0 - term[j, k]) * v_tp1[j, k] - q[j, k])
            if term[j, k] or trunc[j, k]:
                break
        out[k] = target
    return out


def test_retrace_matches_rlax_retrace_continuous_without_truncations():
    # rlax's targets are for times [0, K - 1] from q_t, log_rhos at [1, K - 1] and v_t, r_t,
    # discount_t at [1, K]: shifted by one, its v_t is our V'(s'_j). A termination is a zero
    # discount in rlax (truncation has no rlax counterpart: the loop test covers it).
    q, v_tp1, r, term, _, log_rho = _window(dones=True)
    no_trunc = np.zeros_like(term)
    for terminated in (np.zeros_like(term), term):
        got = returns.retrace_targets(q, v_tp1, r, terminated, no_trunc, log_rho, 0.9, 0.8)
        discount = 0.9 * (1.0 - terminated.astype(np.float32))
        errors = jax.vmap(rlax.retrace_continuous, in_axes=(1, 1, 1, 1, 1, 1, None), out_axes=1)(
            q, q[1:], v_tp1, r, discount, log_rho[1:], 0.8
        )
        np.testing.assert_allclose(got, errors + q, rtol=1e-5, atol=1e-5)


def test_retrace_matches_the_formula_with_terminations_and_truncations():
    q, v_tp1, r, term, trunc, log_rho = _window(seed=1)
    assert np.any(term[:-1]) and np.any(trunc[:-1])
    for lam in (1.0, 0.7):
        got = returns.retrace_targets(q, v_tp1, r, term, trunc, log_rho, 0.95, lam)[0]
        np.testing.assert_allclose(got, _retrace_loop(q, v_tp1, r, term, trunc, log_rho, 0.95, lam), rtol=1e-5,
                                   atol=1e-5)  # fmt: skip


def test_retrace_by_hand_truncation_bootstraps_and_termination_does_not():
    # gamma 0.5, lambda 1, every weight 1. Column 0 is truncated at step 0, column 1 terminated
    # there: step 1 is the next episode's and must not enter either.
    q = jnp.array([[1.0, 1.0], [50.0, 50.0]])
    v_tp1 = jnp.array([[4.0, 4.0], [70.0, 70.0]])
    r = jnp.array([[2.0, 2.0], [30.0, 30.0]])
    term, trunc = jnp.array([[False, True], [False, False]]), jnp.array([[True, False], [False, False]])
    got = returns.retrace_targets(q, v_tp1, r, term, trunc, jnp.zeros((2, 2)), 0.5, 1.0)[0]
    np.testing.assert_allclose(got, [2.0 + 0.5 * 4.0, 2.0])


def test_retrace_on_policy_is_the_n_step_return_of_the_same_critic():
    # c_i = 1 (weights at or above 1, lambda 1) and an action-blind critic (Q'(s_{j+1}, a_{j+1})
    # = V'(s'_j) inside an episode): the corrections telescope to `n_step_targets`'s return.
    q, v_tp1, r, term, trunc, log_rho = _window(seed=2)
    q[1:] = np.where(term[:-1] | trunc[:-1], q[1:], v_tp1[:-1])
    got = returns.retrace_targets(q, v_tp1, r, term, trunc, np.abs(log_rho), 0.9, 1.0)[0]
    partial, last, discount = returns.n_step_targets(r, term, trunc, 0.9)
    want = partial + discount * v_tp1[np.asarray(last), np.arange(r.shape[1])]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
