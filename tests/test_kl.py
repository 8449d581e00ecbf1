"""The KL module: closed forms, Monte Carlo, estimator bias, precision, extremes, controllers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kl_rl import kl

floats = st.floats(-5.0, 5.0, width=32)
log_std_floats = st.floats(-3.0, 2.0, width=32)

kl_jit = jax.jit(kl.kl_divergence)


def _draw(dist, key, n):
    """n samples from `dist` (unbatched) by broadcasting it to a batch of n and sampling once."""
    batched = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), dist)
    return batched.sample(key)


def _mean_se(x):
    x = np.asarray(x, np.float64)
    return x.mean(), x.std() / math.sqrt(len(x))


def _gaussian_kl_np(m_p, s_p, m_q, s_q):
    """KL(p || q) from the general multivariate formula, with full covariance matrices, float64."""
    cov_p, cov_q = np.diag(np.square(s_p)), np.diag(np.square(s_q))
    inv_q = np.linalg.inv(cov_q)
    d = np.asarray(m_q, np.float64) - m_p
    _, logdet_p = np.linalg.slogdet(cov_p)
    _, logdet_q = np.linalg.slogdet(cov_q)
    return 0.5 * (np.trace(inv_q @ cov_p) + d @ inv_q @ d - len(d) + logdet_q - logdet_p)


# --- KL >= 0 and KL(p, p) = 0 -------------------------------------------------------------


def _logits_logits_mask(num_actions):
    logits = hnp.arrays(np.float32, num_actions, elements=floats)
    return st.tuples(logits, logits, hnp.arrays(np.bool_, num_actions))


@given(st.integers(2, 6).flatmap(_logits_logits_mask))
def test_categorical_kl_nonnegative_zero_on_itself_and_matches_numpy(arrays):
    logits_p, logits_q, mask = arrays
    mask = mask.copy()
    mask[np.argmax(logits_p)] = True  # at least one allowed action
    p, q = kl.categorical(jnp.asarray(logits_p), mask), kl.categorical(jnp.asarray(logits_q), mask)
    value = float(kl_jit(p, q))
    assert value >= -1e-6
    assert float(kl_jit(p, p)) == pytest.approx(0.0, abs=1e-6)
    lp = logits_p[mask].astype(np.float64) - np.logaddexp.reduce(logits_p[mask].astype(np.float64))
    lq = logits_q[mask].astype(np.float64) - np.logaddexp.reduce(logits_q[mask].astype(np.float64))
    assert value == pytest.approx(np.sum(np.exp(lp) * (lp - lq)), rel=1e-4, abs=1e-5)


@given(*[hnp.arrays(np.float32, 3, elements=e) for e in (floats, log_std_floats) * 2])
def test_gaussian_kl_nonnegative_zero_on_itself_and_matches_full_covariance(m_p, ls_p, m_q, ls_q):
    p = kl.DiagGaussian(jnp.asarray(m_p), jnp.asarray(ls_p))
    q = kl.DiagGaussian(jnp.asarray(m_q), jnp.asarray(ls_q))
    value = float(kl_jit(p, q))
    assert value >= -1e-5
    assert float(kl_jit(p, p)) == pytest.approx(0.0, abs=1e-6)
    s_p, s_q = np.exp(ls_p.astype(np.float64)), np.exp(ls_q.astype(np.float64))
    expected = _gaussian_kl_np(m_p, s_p, m_q, s_q)
    assert value == pytest.approx(expected, rel=1e-4, abs=1e-5)


# --- closed forms by hand and by Monte Carlo ----------------------------------------------


def test_closed_forms_by_hand():
    # 1-D Gaussians N(0, 1) and N(1, 2^2): log 2 + (1 + 1) / (2 * 4) - 1/2.
    p = kl.DiagGaussian(jnp.array([0.0]), jnp.array([0.0]))
    q = kl.DiagGaussian(jnp.array([1.0]), jnp.log(jnp.array([2.0])))
    assert float(kl.kl_divergence(p, q)) == pytest.approx(math.log(2) + 2 / 8 - 0.5, rel=1e-6)
    # and back: log(1/2) + (4 + 1) / 2 - 1/2.
    assert float(kl.kl_divergence(q, p)) == pytest.approx(-math.log(2) + 2.0, rel=1e-6)
    # Two actions, p = (0.25, 0.75), q = (0.5, 0.5).
    p = kl.Categorical(jnp.log(jnp.array([0.25, 0.75])))
    q = kl.Categorical(jnp.log(jnp.array([0.5, 0.5])))
    forward = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    reverse = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert float(kl.kl_divergence(p, q)) == pytest.approx(forward, rel=1e-6)
    assert float(kl.kl_divergence(q, p)) == pytest.approx(reverse, rel=1e-6)
    # Direction helpers: kl_old_new(old, new) = KL(old || new); kl_new_old = KL(new || old).
    assert float(kl.kl_old_new(p, q)) == pytest.approx(forward, rel=1e-6)
    assert float(kl.kl_new_old(p, q)) == pytest.approx(reverse, rel=1e-6)
    # Near-deterministic [50, -50] vs [-50, 50]: p puts 1 - 4e-44 on action 0, where log q = -100.
    p, q = kl.Categorical(jnp.array([50.0, -50.0])), kl.Categorical(jnp.array([-50.0, 50.0]))
    assert float(kl.kl_divergence(p, q)) == pytest.approx(100.0, rel=1e-6)


def test_kl_of_batched_distributions_is_per_element():
    key_p, key_q = jax.random.split(jax.random.key(0))
    p = kl.DiagGaussian(jax.random.normal(key_p, (4, 5, 3)), jnp.full((4, 5, 3), 0.2))
    q = kl.DiagGaussian(jax.random.normal(key_q, (4, 5, 3)), jnp.zeros((4, 5, 3)))
    batched = kl.kl_divergence(p, q)
    assert batched.shape == (4, 5)
    per_element = jax.vmap(jax.vmap(kl.kl_divergence))(p, q)
    np.testing.assert_allclose(batched, per_element, rtol=1e-6)
    c = kl.Categorical(jax.random.normal(key_p, (7, 4)))
    assert kl.kl_divergence(c, kl.Categorical(jnp.zeros(4))).shape == (7,)  # q broadcasts
    with pytest.raises(TypeError):
        kl.kl_divergence(c, p)


@pytest.mark.parametrize(
    "p, q",
    [
        (kl.Categorical(jnp.array([0.3, -1.0, 2.0])), kl.Categorical(jnp.array([1.0, 0.5, -0.5]))),
        (
            kl.categorical(jnp.array([0.3, 4.0, 2.0, 0.0]), jnp.array([True, False, True, True])),
            kl.categorical(jnp.array([1.0, -2.0, -0.5, 0.7]), jnp.array([True, False, True, True])),
        ),
        (
            kl.DiagGaussian(jnp.array([0.5, -1.0]), jnp.array([0.2, -0.3])),
            kl.DiagGaussian(jnp.array([0.0, 0.0]), jnp.array([0.0, 0.4])),
        ),
    ],
    ids=["categorical", "masked-categorical", "gaussian"],
)
def test_closed_forms_match_monte_carlo(p, q):
    x = _draw(p, jax.random.key(0), 200_000)
    mean, se = _mean_se(p.log_prob(x) - q.log_prob(x))
    assert abs(mean - float(kl.kl_divergence(p, q))) < 4 * se, (mean, se)


def test_entropy_closed_forms_and_monte_carlo():
    g = kl.DiagGaussian(jnp.array([0.0, 3.0]), jnp.array([0.5, -1.0]))
    expected = 0.5 - 1.0 + 2 * 0.5 * math.log(2 * math.pi * math.e)
    assert float(g.entropy()) == pytest.approx(expected, rel=1e-6)
    probs = np.array([0.2, 0.3, 0.5])
    c = kl.Categorical(jnp.log(jnp.asarray(probs)))
    assert float(c.entropy()) == pytest.approx(-np.sum(probs * np.log(probs)), rel=1e-6)
    # A mask leaves the entropy of the allowed actions; a near-deterministic one has ~0.
    masked = kl.categorical(jnp.array([0.0, 9.0, 0.0]), jnp.array([True, False, True]))
    assert float(masked.entropy()) == pytest.approx(math.log(2), rel=1e-6)
    near_deterministic = kl.Categorical(jnp.array([50.0, -50.0]))
    assert float(near_deterministic.entropy()) == pytest.approx(0.0, abs=1e-30)
    for d in (g, c, masked):
        x = _draw(d, jax.random.key(1), 200_000)
        mean, se = _mean_se(-d.log_prob(x))
        assert abs(mean - float(d.entropy())) < 4 * se + 1e-6


# --- log_prob, sample, mode ---------------------------------------------------------------


def test_gaussian_log_prob_matches_the_multivariate_density():
    mean, std = np.array([1.0, -2.0, 0.0]), np.exp([0.3, -0.7, 1.5])
    x = np.array([0.2, -1.5, 3.0])
    cov = np.diag(std**2)
    d = x - mean
    expected = -0.5 * (d @ np.linalg.inv(cov) @ d + np.linalg.slogdet(2 * np.pi * cov)[1])
    dist = kl.DiagGaussian(jnp.asarray(mean, jnp.float32), jnp.log(jnp.asarray(std, jnp.float32)))
    assert float(dist.log_prob(jnp.asarray(x, jnp.float32))) == pytest.approx(expected, rel=1e-6)
    # log_std broadcasts against mean: a shared [D] log-std for a [B, D] batch.
    batch = kl.DiagGaussian(jnp.zeros((5, 3)), jnp.log(jnp.asarray(std, jnp.float32)))
    assert batch.log_prob(jnp.zeros((5, 3))).shape == (5,) and batch.entropy().shape == (5,)


def test_sample_and_mode_shapes_and_moments():
    key = jax.random.key(3)
    g = kl.DiagGaussian(jnp.zeros((4, 2)) + jnp.array([1.0, -3.0]), jnp.log(jnp.array([0.5, 2.0])))
    assert g.sample(key).shape == (4, 2) and g.mode().shape == (4, 2)
    c = kl.Categorical(jnp.zeros((4, 6)).at[:, 2].set(3.0))
    assert c.sample(key).shape == (4,) and c.sample(key).dtype == jnp.int32
    np.testing.assert_array_equal(c.mode(), [2, 2, 2, 2])
    unbatched = kl.DiagGaussian(jnp.array([1.0, -3.0]), jnp.log(jnp.array([0.5, 2.0])))
    x = np.asarray(_draw(unbatched, key, 100_000))
    assert np.all(np.abs(x.mean(0) - [1.0, -3.0]) < 4 * np.array([0.5, 2.0]) / math.sqrt(len(x)))
    np.testing.assert_allclose(x.std(0), [0.5, 2.0], rtol=0.01)


def test_categorical_log_prob_broadcasts_and_sample_frequencies_match_probs():
    probs = np.array([0.1, 0.6, 0.3])
    c = kl.Categorical(jnp.log(jnp.asarray(probs)))
    np.testing.assert_allclose(c.log_prob(jnp.array([0, 1, 2])), np.log(probs), rtol=1e-6)
    batch = kl.Categorical(jnp.log(jnp.tile(jnp.asarray(probs), (2, 1))))
    assert batch.log_prob(jnp.array(1)).shape == (2,)
    np.testing.assert_allclose(c.probs, probs, rtol=1e-6)
    n = 100_000
    freq = np.bincount(np.asarray(_draw(c, jax.random.key(4), n)), minlength=3) / n
    assert np.all(np.abs(freq - probs) < 4 * np.sqrt(probs * (1 - probs) / n))


def test_masked_actions_are_never_sampled_or_chosen():
    mask = jnp.array([[True, False, True, False], [False, False, False, True]])
    c = kl.categorical(jnp.array([[0.5, 30.0, -1.0, 30.0], [9.0, 9.0, 9.0, -9.0]]), mask)
    samples = np.asarray(jax.vmap(c.sample)(jax.random.split(jax.random.key(0), 20_000)))
    assert set(np.unique(samples[:, 0])) == {0, 2}
    assert set(np.unique(samples[:, 1])) == {3}
    np.testing.assert_array_equal(c.mode(), [0, 3])
    np.testing.assert_array_equal(c.log_prob(jnp.array([1, 0])), [-np.inf, -np.inf])
    expected = [np.log(1 / (1 + np.exp(-1.5))), 0.0]
    np.testing.assert_allclose(c.log_prob(jnp.array([0, 3])), expected, rtol=1e-6)


def test_distributions_are_pytrees():
    g = kl.DiagGaussian(jnp.zeros((3, 2)), jnp.zeros((3, 2)))
    stacked = jax.tree.map(lambda *x: jnp.stack(x), g, g)
    assert isinstance(stacked, kl.DiagGaussian) and stacked.mean.shape == (2, 3, 2)

    def step(total, dist):
        return total + kl.kl_divergence(dist, kl.Categorical(jnp.zeros(2))), None

    logits = jnp.log(jnp.array([[0.5, 0.5], [0.25, 0.75]]))
    total, _ = jax.lax.scan(step, jnp.zeros(()), kl.Categorical(logits))
    assert float(total) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-6)


# --- sample estimators (Schulman 2020) ----------------------------------------------------


def _log_probs_under_q(p, q, n=400_000):
    """log p(x), log q(x) for x ~ q."""
    x = _draw(q, jax.random.key(2), n)
    return p.log_prob(x), q.log_prob(x)


@pytest.mark.parametrize(
    "p, q",
    [
        (
            kl.DiagGaussian(jnp.array([1.0]), jnp.log(jnp.array([0.8]))),
            kl.DiagGaussian(jnp.zeros(1), jnp.zeros(1)),
        ),
        (
            kl.Categorical(jnp.log(jnp.array([0.2, 0.3, 0.5]))),
            kl.Categorical(jnp.log(jnp.array([0.7, 0.25, 0.05]))),
        ),
    ],
    ids=["gaussian", "categorical"],
)
def test_k1_k3_unbiased_for_kl_q_p_and_reverse_k3_for_kl_p_q(p, q):
    log_p, log_q = _log_probs_under_q(p, q)
    kl_qp, kl_pq = float(kl.kl_divergence(q, p)), float(kl.kl_divergence(p, q))
    assert abs(kl_qp - kl_pq) > 0.1  # asymmetric, so a wrong direction would show
    for est in (kl.kl_k1, kl.kl_k3):
        mean, se = _mean_se(est(log_p, log_q))
        assert abs(mean - kl_qp) < 4 * se, (est.__name__, mean, kl_qp, se)
    mean, se = _mean_se(kl.kl_reverse_k3(log_p, log_q))
    assert abs(mean - kl_pq) < 4 * se, (mean, kl_pq, se)
    assert abs(mean - kl_qp) > 20 * se
    assert float(jnp.min(kl.kl_k3(log_p, log_q))) >= 0.0
    assert float(jnp.min(kl.kl_reverse_k3(log_p, log_q))) >= 0.0


def test_k2_biased_far_from_q_close_near_q_and_k3_lower_variance():
    # q = N(0, 1), p = N(mu, 1): log r = mu x - mu^2/2 ~ N(-mu^2/2, mu^2), so
    # E[k2] = (mu^2 + mu^4/4) / 2 while KL(q || p) = mu^2 / 2.
    q = kl.DiagGaussian(jnp.zeros(1), jnp.zeros(1))
    for mu, bias_is_large in ((1.0, True), (0.1, False)):
        p = kl.DiagGaussian(jnp.array([mu]), jnp.zeros(1))
        log_p, log_q = _log_probs_under_q(p, q)
        true_kl = float(kl.kl_divergence(q, p))
        assert true_kl == pytest.approx(mu**2 / 2, rel=1e-6)
        mean, se = _mean_se(kl.kl_k2(log_p, log_q))
        assert abs(mean - (mu**2 + mu**4 / 4) / 2) < 4 * se  # k2's own expectation
        if bias_is_large:  # 0.625 vs 0.5: a 25% bias, ~90 standard errors
            assert mean - true_kl > 20 * se
        else:  # 0.0050125 vs 0.005: 0.25%, about one standard error
            assert abs(mean - true_kl) < 4 * se and abs(mean / true_kl - 1) < 0.01
        var_k1 = np.var(np.asarray(kl.kl_k1(log_p, log_q)))
        var_k3 = np.var(np.asarray(kl.kl_k3(log_p, log_q)))
        # Near q, k3 ~ (log r)^2 / 2 while k1 ~ log r: var 5e-5 vs 1e-2.
        assert var_k3 < (var_k1 if bias_is_large else var_k1 / 50)


@given(st.floats(-1e4, 1e4, width=32), st.floats(-1e4, 1e4, width=32))
@settings(max_examples=100)
def test_k2_k3_and_reverse_are_nonnegative_per_sample(log_p, log_q):
    log_p, log_q = jnp.float32(log_p), jnp.float32(log_q)
    for est in (kl.kl_k2, kl.kl_k3, kl.kl_reverse_k3):
        value = float(est(log_p, log_q))
        assert value >= 0.0 and math.isfinite(value), est.__name__
    assert float(kl.kl_k1(log_p, log_q)) == pytest.approx(float(log_q - log_p))


def test_k3_and_reverse_are_accurate_near_r_equal_one():
    mags = np.logspace(-7, math.log10(25.0), 60)
    log_r = np.concatenate([-mags, mags, [0.0, 0.2, -0.2, -1.0]]).astype(np.float32)
    l64 = log_r.astype(np.float64)
    k3_ref = np.expm1(l64) - l64
    reverse_ref = np.exp(l64) * l64 - np.expm1(l64)
    # In float64 the direct forms lose ~1e-16 / l relative: a fine reference for |l| >= 1e-7.
    k3 = np.asarray(kl.kl_k3(jnp.asarray(log_r), jnp.zeros_like(log_r)), np.float64)
    rev = np.asarray(kl.kl_reverse_k3(jnp.asarray(log_r), jnp.zeros_like(log_r)), np.float64)
    np.testing.assert_allclose(k3, k3_ref, rtol=2e-6, atol=1e-30)
    np.testing.assert_allclose(rev, reverse_ref, rtol=2e-6, atol=1e-30)
    # exp(l) - 1 - l in float32 would be 0 or off by orders of magnitude here.
    k3_small = float(kl.kl_k3(jnp.float32(1e-4), jnp.float32(0.0)))
    assert k3_small == pytest.approx(5.0001667e-9, rel=1e-6)
    # Gradients agree with the closed-form derivatives, also across the series cutoff.
    grad_k3 = jax.vmap(jax.grad(kl.kl_k3))(jnp.asarray(log_r), jnp.zeros_like(log_r))
    grad_rev = jax.vmap(jax.grad(kl.kl_reverse_k3))(jnp.asarray(log_r), jnp.zeros_like(log_r))
    np.testing.assert_allclose(grad_k3, np.expm1(l64), rtol=2e-5, atol=1e-30)
    np.testing.assert_allclose(grad_rev, np.exp(l64) * l64, rtol=2e-5, atol=1e-30)


def test_estimators_finite_for_huge_and_infinite_log_ratios():
    log_p = jnp.array([0.0, -200.0, 0.0, -1e15, -jnp.inf])
    log_q = jnp.array([-200.0, 0.0, 0.0, 0.0, 0.0])
    for est in (kl.kl_k2, kl.kl_k3, kl.kl_reverse_k3):
        value, grad = jax.value_and_grad(lambda lp, est=est: jnp.sum(est(lp, log_q[:4])))(log_p[:4])
        assert np.isfinite(value) and np.all(np.isfinite(grad)), est.__name__
    # p(x) = 0 for a sample of q: KL(q || p) is infinite and k1, k3 say so; r log r - (r - 1) -> 1.
    assert float(kl.kl_k1(log_p, log_q)[-1]) == np.inf
    assert float(kl.kl_k3(log_p, log_q)[-1]) == np.inf
    assert float(kl.kl_reverse_k3(log_p, log_q)[-1]) == pytest.approx(1.0)
    grad = jax.grad(lambda lp: jnp.sum(kl.kl_reverse_k3(lp, log_q)))(log_p)
    assert np.all(np.isfinite(grad))
    assert float(kl.kl_k3(jnp.array(0.0), jnp.array(0.0))) == 0.0
    assert float(kl.kl_reverse_k3(jnp.array(0.0), jnp.array(0.0))) == 0.0


# --- finite values and gradients at the extremes ------------------------------------------


def test_masked_categoricals_stay_finite_in_value_and_gradient():
    mask = jnp.array([True, False, True, False])
    old_logits, new_logits = jnp.array([0.5, 3.0, -1.0, 2.0]), jnp.array([1.0, 0.0, 0.0, 0.0])

    def f(new_logits, old_logits):
        old, new = kl.categorical(old_logits, mask), kl.categorical(new_logits, mask)
        kls = kl.kl_divergence(old, new) + kl.kl_divergence(new, old)
        return kls + new.entropy() + new.log_prob(jnp.array(2))

    value, grads = jax.value_and_grad(f, argnums=(0, 1))(new_logits, old_logits)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)
    for g in grads:
        np.testing.assert_array_equal(g[~np.asarray(mask)], 0.0)
    # Gradients straight through -inf logits (no categorical() where) are finite too.
    raw = jnp.where(mask, new_logits, -jnp.inf)
    other = kl.Categorical(jnp.where(mask, jnp.array([0.2, 5.0, -0.3, 1.0]), -jnp.inf))

    def through_inf(logits):
        return kl.kl_divergence(kl.Categorical(logits), other) + kl.Categorical(logits).entropy()

    g = jax.grad(through_inf)(raw)
    assert np.all(np.isfinite(g))
    # The masked KL equals the KL of the allowed actions alone.
    sub = jnp.array([0, 2])
    expected = kl.kl_divergence(kl.Categorical(old_logits[sub]), kl.Categorical(new_logits[sub]))
    masked = kl.kl_divergence(kl.categorical(old_logits, mask), kl.categorical(new_logits, mask))
    assert float(masked) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize(
    "logits", [[50.0, -50.0], [-50.0, 50.0, 0.0], [1e-3, 0.0], [80.0, -80.0, 0.0]]
)
def test_near_deterministic_categoricals_stay_finite(logits):
    logits = jnp.array(logits)

    def f(x):
        p, q = kl.Categorical(x), kl.Categorical(logits[::-1])
        kls = kl.kl_divergence(p, q) + kl.kl_divergence(q, p)
        return kls + p.entropy() + p.log_prob(jnp.array(1))

    value, grad = jax.value_and_grad(f)(logits)
    assert np.isfinite(value) and np.all(np.isfinite(grad))


@given(
    hnp.arrays(np.float32, 2, elements=st.floats(-10.0, 10.0, width=32)),
    *[hnp.arrays(np.float32, 2, elements=st.floats(-20.0, 5.0, width=32))] * 2,
)
@settings(max_examples=30)
def test_gaussians_stay_finite_for_log_stds_from_minus_20_to_5(mean, ls_p, ls_q):
    x = jnp.array([0.3, -0.1])

    def f(mean_p, log_std_p, log_std_q):
        p = kl.DiagGaussian(mean_p, log_std_p)
        q = kl.DiagGaussian(jnp.zeros(2), log_std_q)
        return kl.kl_divergence(p, q) + kl.kl_divergence(q, p) + p.entropy() + p.log_prob(x)

    args = (jnp.asarray(mean), jnp.asarray(ls_p), jnp.asarray(ls_q))
    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(*args)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)


# --- controllers --------------------------------------------------------------------------


def test_adaptive_controller_halves_and_doubles():
    ctrl = kl.adaptive_kl_controller(1.0, 0.01)
    state = ctrl.init()
    assert state.beta.dtype == jnp.float32
    assert float(ctrl.update(state, jnp.array(0.02)).beta) == 2.0  # > 1.5 x target
    assert float(ctrl.update(state, jnp.array(0.005)).beta) == 0.5  # < target / 1.5
    assert float(ctrl.update(state, jnp.array(0.01)).beta) == 1.0  # in between: unchanged
    assert float(ctrl.update(state, jnp.array(0.0149), 512).beta) == 1.0
    assert float(ctrl.update(state, jnp.array(0.0067)).beta) == 1.0


def test_adaptive_controller_in_a_scan():
    ctrl = kl.adaptive_kl_controller(1.0, 0.01)

    def step(state, kl_t):
        state = ctrl.update(state, kl_t)
        return state, state.beta

    kls = jnp.array([0.05, 0.05, 0.01, 0.001, 0.001, 0.001, 0.02])
    _, betas = jax.lax.scan(step, ctrl.init(), kls)
    np.testing.assert_array_equal(betas, [2.0, 4.0, 4.0, 2.0, 1.0, 0.5, 1.0])


def test_proportional_controller_by_hand():
    ctrl = kl.proportional_kl_controller(0.5, 0.1, horizon=1000.0, k_beta=0.1)
    state = ctrl.init()
    # e = clip(0.15 / 0.1 - 1, -0.2, 0.2) = 0.2; beta = 0.5 (1 + 0.1 * 0.2 * 256 / 1000)
    beta = float(ctrl.update(state, jnp.array(0.15), 256).beta)
    assert beta == pytest.approx(0.5 * (1 + 0.1 * 0.2 * 0.256), rel=1e-6)
    # e = 0.11 / 0.1 - 1 = 0.1, inside the clip
    beta = float(ctrl.update(state, jnp.array(0.11), 500).beta)
    assert beta == pytest.approx(0.5 * (1 + 0.1 * 0.1 * 0.5), rel=1e-5)
    # e = 0.0 / 0.1 - 1 = -1, clipped to -0.2; default n_steps = 1
    beta = float(ctrl.update(state, jnp.array(0.0)).beta)
    assert beta == pytest.approx(0.5 * (1 - 0.1 * 0.2 / 1000), rel=1e-6)


@pytest.mark.parametrize("make", ["fixed", "adaptive", "proportional"])
def test_controllers_jit_and_vmap_over_traced_hyperparameters(make):
    @jax.jit
    def run(init_beta, target):
        ctrl = {
            "fixed": lambda: kl.fixed_kl_controller(init_beta),
            "adaptive": lambda: kl.adaptive_kl_controller(init_beta, target),
            "proportional": lambda: kl.proportional_kl_controller(init_beta, target, 10.0, 1.0),
        }[make]()
        state = ctrl.update(ctrl.init(), jnp.array(1.0), 5)
        return state.beta

    betas = jax.vmap(run)(jnp.array([1.0, 2.0]), jnp.array([0.01, 10.0]))
    assert betas.dtype == jnp.float32
    expected = {
        "fixed": [1.0, 2.0],
        "adaptive": [2.0, 1.0],
        "proportional": [1.0 * (1 + 0.2 * 5 / 10), 2.0 * (1 - 0.2 * 5 / 10)],
    }[make]
    np.testing.assert_allclose(betas, expected, rtol=1e-6)


# --- penalties ----------------------------------------------------------------------------


def test_penalties_by_hand():
    assert float(kl.kl_penalty_loss(0.5, jnp.array([0.2, 0.4]))) == pytest.approx(0.15)
    r = kl.kl_penalized_reward(jnp.array(1.0), jnp.log(0.5), jnp.log(0.25), 0.1)
    assert float(r) == pytest.approx(1.0 - 0.1 * math.log(2.0), rel=1e-6)


def test_penalized_reward_subtracts_beta_kl_policy_ref_in_expectation():
    policy = kl.Categorical(jnp.log(jnp.array([0.7, 0.2, 0.1])))
    ref = kl.Categorical(jnp.log(jnp.array([0.1, 0.3, 0.6])))
    a = _draw(policy, jax.random.key(5), 200_000)
    reward = kl.kl_penalized_reward(jnp.zeros(a.shape), policy.log_prob(a), ref.log_prob(a), 2.0)
    penalty = -np.asarray(reward)
    mean, se = _mean_se(penalty)
    assert abs(mean - 2.0 * float(kl.kl_divergence(policy, ref))) < 4 * se
    # and not the other direction
    assert abs(mean - 2.0 * float(kl.kl_divergence(ref, policy))) > 10 * se
