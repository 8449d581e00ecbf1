"""The KL module: closed forms, Monte Carlo, estimator bias, precision, extremes, controllers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from monte_carlo import draw, mean_se

from kl_rl import kl
from kl_rl.distributions import Categorical, DiagGaussian, categorical

floats = st.floats(-5.0, 5.0, width=32)
log_std_floats = st.floats(-3.0, 2.0, width=32)

kl_jit = jax.jit(kl.kl_divergence)


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
    p, q = categorical(jnp.asarray(logits_p), mask), categorical(jnp.asarray(logits_q), mask)
    value = float(kl_jit(p, q))
    assert value >= -1e-6
    assert float(kl_jit(p, p)) == pytest.approx(0.0, abs=1e-6)
    lp = logits_p[mask].astype(np.float64) - np.logaddexp.reduce(logits_p[mask].astype(np.float64))
    lq = logits_q[mask].astype(np.float64) - np.logaddexp.reduce(logits_q[mask].astype(np.float64))
    assert value == pytest.approx(np.sum(np.exp(lp) * (lp - lq)), rel=1e-4, abs=1e-5)


@given(*[hnp.arrays(np.float32, 3, elements=e) for e in (floats, log_std_floats) * 2])
def test_gaussian_kl_nonnegative_zero_on_itself_and_matches_full_covariance(m_p, ls_p, m_q, ls_q):
    p = DiagGaussian(jnp.asarray(m_p), jnp.asarray(ls_p))
    q = DiagGaussian(jnp.asarray(m_q), jnp.asarray(ls_q))
    value = float(kl_jit(p, q))
    assert value >= -1e-5
    assert float(kl_jit(p, p)) == pytest.approx(0.0, abs=1e-6)
    s_p, s_q = np.exp(ls_p.astype(np.float64)), np.exp(ls_q.astype(np.float64))
    expected = _gaussian_kl_np(m_p, s_p, m_q, s_q)
    assert value == pytest.approx(expected, rel=1e-4, abs=1e-5)


# --- closed forms by hand and by Monte Carlo ----------------------------------------------


def test_closed_forms_by_hand():
    # 1-D Gaussians N(0, 1) and N(1, 2^2): log 2 + (1 + 1) / (2 * 4) - 1/2.
    p = DiagGaussian(jnp.array([0.0]), jnp.array([0.0]))
    q = DiagGaussian(jnp.array([1.0]), jnp.log(jnp.array([2.0])))
    assert float(kl.kl_divergence(p, q)) == pytest.approx(math.log(2) + 2 / 8 - 0.5, rel=1e-6)
    # and back: log(1/2) + (4 + 1) / 2 - 1/2.
    assert float(kl.kl_divergence(q, p)) == pytest.approx(-math.log(2) + 2.0, rel=1e-6)
    # Two actions, p = (0.25, 0.75), q = (0.5, 0.5).
    p = Categorical(jnp.log(jnp.array([0.25, 0.75])))
    q = Categorical(jnp.log(jnp.array([0.5, 0.5])))
    forward = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    reverse = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert float(kl.kl_divergence(p, q)) == pytest.approx(forward, rel=1e-6)
    assert float(kl.kl_divergence(q, p)) == pytest.approx(reverse, rel=1e-6)
    # Direction helpers: kl_old_new(old, new) = KL(old || new); kl_new_old = KL(new || old).
    assert float(kl.kl_old_new(p, q)) == pytest.approx(forward, rel=1e-6)
    assert float(kl.kl_new_old(p, q)) == pytest.approx(reverse, rel=1e-6)
    # Near-deterministic [50, -50] vs [-50, 50]: p puts 1 - 4e-44 on action 0, where log q = -100.
    p, q = Categorical(jnp.array([50.0, -50.0])), Categorical(jnp.array([-50.0, 50.0]))
    assert float(kl.kl_divergence(p, q)) == pytest.approx(100.0, rel=1e-6)


def test_kl_of_batched_distributions_is_per_element():
    key_p, key_q = jax.random.split(jax.random.key(0))
    p = DiagGaussian(jax.random.normal(key_p, (4, 5, 3)), jnp.full((4, 5, 3), 0.2))
    q = DiagGaussian(jax.random.normal(key_q, (4, 5, 3)), jnp.zeros((4, 5, 3)))
    batched = kl.kl_divergence(p, q)
    assert batched.shape == (4, 5)
    per_element = jax.vmap(jax.vmap(kl.kl_divergence))(p, q)
    np.testing.assert_allclose(batched, per_element, rtol=1e-6)
    c = Categorical(jax.random.normal(key_p, (7, 4)))
    assert kl.kl_divergence(c, Categorical(jnp.zeros(4))).shape == (7,)  # q broadcasts
    with pytest.raises(TypeError):
        kl.kl_divergence(c, p)


@pytest.mark.parametrize(
    "p, q",
    [
        (Categorical(jnp.array([0.3, -1.0, 2.0])), Categorical(jnp.array([1.0, 0.5, -0.5]))),
        (
            categorical(jnp.array([0.3, 4.0, 2.0, 0.0]), jnp.array([True, False, True, True])),
            categorical(jnp.array([1.0, -2.0, -0.5, 0.7]), jnp.array([True, False, True, True])),
        ),
        (
            DiagGaussian(jnp.array([0.5, -1.0]), jnp.array([0.2, -0.3])),
            DiagGaussian(jnp.array([0.0, 0.0]), jnp.array([0.0, 0.4])),
        ),
    ],
    ids=["categorical", "masked-categorical", "gaussian"],
)
def test_closed_forms_match_monte_carlo(p, q):
    x = draw(p, jax.random.key(0), 200_000)
    mean, se = mean_se(p.log_prob(x) - q.log_prob(x))
    assert abs(mean - float(kl.kl_divergence(p, q))) < 4 * se, (mean, se)


# --- sample estimators (Schulman 2020) ----------------------------------------------------


def _log_probs_under_q(p, q, n=400_000):
    """log p(x), log q(x) for x ~ q."""
    x = draw(q, jax.random.key(2), n)
    return p.log_prob(x), q.log_prob(x)


@pytest.mark.parametrize(
    "p, q",
    [
        (
            DiagGaussian(jnp.array([1.0]), jnp.log(jnp.array([0.8]))),
            DiagGaussian(jnp.zeros(1), jnp.zeros(1)),
        ),
        (
            Categorical(jnp.log(jnp.array([0.2, 0.3, 0.5]))),
            Categorical(jnp.log(jnp.array([0.7, 0.25, 0.05]))),
        ),
    ],
    ids=["gaussian", "categorical"],
)
def test_k1_k3_unbiased_for_kl_q_p_and_reverse_k3_for_kl_p_q(p, q):
    log_p, log_q = _log_probs_under_q(p, q)
    kl_qp, kl_pq = float(kl.kl_divergence(q, p)), float(kl.kl_divergence(p, q))
    assert abs(kl_qp - kl_pq) > 0.1  # asymmetric, so a wrong direction would show
    for est in (kl.kl_k1, kl.kl_k3):
        mean, se = mean_se(est(log_p, log_q))
        assert abs(mean - kl_qp) < 4 * se, (est.__name__, mean, kl_qp, se)
    mean, se = mean_se(kl.kl_reverse_k3(log_p, log_q))
    assert abs(mean - kl_pq) < 4 * se, (mean, kl_pq, se)
    assert abs(mean - kl_qp) > 20 * se
    assert float(jnp.min(kl.kl_k3(log_p, log_q))) >= 0.0
    assert float(jnp.min(kl.kl_reverse_k3(log_p, log_q))) >= 0.0


def test_k2_biased_far_from_q_close_near_q_and_k3_lower_variance():
    # q = N(0, 1), p = N(mu, 1): log r = mu x - mu^2/2 ~ N(-mu^2/2, mu^2), so
    # E[k2] = (mu^2 + mu^4/4) / 2 while KL(q || p) = mu^2 / 2.
    q = DiagGaussian(jnp.zeros(1), jnp.zeros(1))
    for mu, bias_is_large in ((1.0, True), (0.1, False)):
        p = DiagGaussian(jnp.array([mu]), jnp.zeros(1))
        log_p, log_q = _log_probs_under_q(p, q)
        true_kl = float(kl.kl_divergence(q, p))
        assert true_kl == pytest.approx(mu**2 / 2, rel=1e-6)
        mean, se = mean_se(kl.kl_k2(log_p, log_q))
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
        old, new = categorical(old_logits, mask), categorical(new_logits, mask)
        kls = kl.kl_divergence(old, new) + kl.kl_divergence(new, old)
        return kls + new.entropy() + new.log_prob(jnp.array(2))

    value, grads = jax.value_and_grad(f, argnums=(0, 1))(new_logits, old_logits)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)
    for g in grads:
        np.testing.assert_array_equal(g[~np.asarray(mask)], 0.0)
    # Gradients straight through -inf logits (no categorical() where) are finite too.
    raw = jnp.where(mask, new_logits, -jnp.inf)
    other = Categorical(jnp.where(mask, jnp.array([0.2, 5.0, -0.3, 1.0]), -jnp.inf))

    def through_inf(logits):
        return kl.kl_divergence(Categorical(logits), other) + Categorical(logits).entropy()

    g = jax.grad(through_inf)(raw)
    assert np.all(np.isfinite(g))
    # The masked KL equals the KL of the allowed actions alone.
    sub = jnp.array([0, 2])
    expected = kl.kl_divergence(Categorical(old_logits[sub]), Categorical(new_logits[sub]))
    masked = kl.kl_divergence(categorical(old_logits, mask), categorical(new_logits, mask))
    assert float(masked) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize(
    "logits", [[50.0, -50.0], [-50.0, 50.0, 0.0], [1e-3, 0.0], [80.0, -80.0, 0.0]]
)
def test_near_deterministic_categoricals_stay_finite(logits):
    logits = jnp.array(logits)

    def f(x):
        p, q = Categorical(x), Categorical(logits[::-1])
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
        p = DiagGaussian(mean_p, log_std_p)
        q = DiagGaussian(jnp.zeros(2), log_std_q)
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


def test_decoupled_gaussian_kl_halves_are_the_kl_with_one_moment_held_at_old():
    old = DiagGaussian(jnp.array([[0.3, -1.0], [2.0, 0.0]]), jnp.array([[-0.5, 0.2], [1.0, -3.0]]))
    new = DiagGaussian(jnp.array([[0.1, -0.2], [2.5, 0.4]]), jnp.array([[0.4, 0.1], [1.0, -2.0]]))
    c_mu, c_sigma = kl.decoupled_gaussian_kl(old, new)
    np.testing.assert_allclose(c_mu, kl.kl_old_new(old, DiagGaussian(new.mean, old.log_std)), rtol=1e-6)
    np.testing.assert_allclose(c_sigma, kl.kl_old_new(old, DiagGaussian(old.mean, new.log_std)), rtol=1e-5)
    # Near equal stds the covariance half stays >= 0 and second order: (2 l^2) / 2 per dimension.
    unit = DiagGaussian(jnp.zeros(3), jnp.zeros(3))
    for log_s in (1e-4, -1e-4, 3e-3):
        _, c = kl.decoupled_gaussian_kl(DiagGaussian(jnp.zeros(3), jnp.full(3, log_s)), unit)
        np.testing.assert_allclose(c, 3 * log_s**2, rtol=1e-2)
    # And the constraint loss: its value is alpha * epsilon; its gradients split between alpha and the KL.
    d = jnp.array([0.1, 0.3])
    np.testing.assert_allclose(kl.kl_constraint_loss(2.0, d, 0.05), 2.0 * 0.05, rtol=1e-6)
    g_alpha, g_kl = jax.grad(kl.kl_constraint_loss, argnums=(0, 1))(2.0, d, 0.05)
    np.testing.assert_allclose(g_alpha, 0.05 - 0.2, rtol=1e-6)
    np.testing.assert_allclose(g_kl, [1.0, 1.0], rtol=1e-6)


def test_penalized_reward_subtracts_beta_kl_policy_ref_in_expectation():
    policy = Categorical(jnp.log(jnp.array([0.7, 0.2, 0.1])))
    ref = Categorical(jnp.log(jnp.array([0.1, 0.3, 0.6])))
    a = draw(policy, jax.random.key(5), 200_000)
    reward = kl.kl_penalized_reward(jnp.zeros(a.shape), policy.log_prob(a), ref.log_prob(a), 2.0)
    penalty = -np.asarray(reward)
    mean, se = mean_se(penalty)
    assert abs(mean - 2.0 * float(kl.kl_divergence(policy, ref))) < 4 * se
    # and not the other direction
    assert abs(mean - 2.0 * float(kl.kl_divergence(ref, policy))) > 10 * se


# --- anchors: anchor_kl, anchor_kl_estimate, anchor_penalty -------------------------------
#
# Expectations under pi are taken by exact summation over a categorical's actions, or by
# 40-point Gauss-Hermite quadrature for a 1-D Gaussian, so the checks are exact to float
# precision rather than up to Monte Carlo noise.


_ESTIMATOR_DIRECTIONS = (("k1", "reverse"), ("k2", "reverse"), ("k3", "reverse"), ("k1", "forward"), ("k3", "forward"))


def _anchor_logits():
    """pi and ref logits [4, 5]; row 3 masks action 1 (-inf) in both."""
    rng = np.random.default_rng(7)
    pi, ref = 1.5 * rng.normal(size=(2, 4, 5)).astype(np.float32)
    pi[3, 1] = ref[3, 1] = -np.inf
    return jnp.asarray(pi), jnp.asarray(ref)


def _expect_over_actions(pi_logits, ref_logits, estimator, direction, loss=None):
    """sum_a pi(a) * f(a) per row, f = anchor_kl_estimate, or loss(l) of l = log pi - log ref.

    The weights pi(a) are stop-gradient (samples held fixed); masked actions (pi(a) = 0, never
    sampled) are left out of the sum.
    """
    log_pi, log_ref = jax.nn.log_softmax(pi_logits), jax.nn.log_softmax(ref_logits)
    valid = log_pi > -jnp.inf
    log_pi, log_ref = jnp.where(valid, log_pi, 0.0), jnp.where(valid, log_ref, 0.0)
    values = kl.anchor_kl_estimate(log_pi, log_ref, estimator, direction) if loss is None else loss(log_pi, log_ref)
    weights = jax.lax.stop_gradient(jnp.exp(log_pi))
    return jnp.sum(jnp.where(valid, weights * values, 0.0), axis=-1)


def test_anchor_estimators_expectations_are_the_kl_in_their_direction():
    pi_logits, ref_logits = _anchor_logits()
    pi, ref = Categorical(pi_logits), Categorical(ref_logits)
    reverse, forward = kl.kl_divergence(pi, ref), kl.kl_divergence(ref, pi)
    assert np.all(np.isfinite(reverse)) and np.all(np.isfinite(forward))
    assert np.all(np.abs(np.asarray(reverse) - np.asarray(forward)) > 0.05)  # directions differ
    np.testing.assert_array_equal(kl.anchor_kl(pi, ref, "reverse"), reverse)
    np.testing.assert_array_equal(kl.anchor_kl(pi, ref), reverse)  # reverse is the default
    np.testing.assert_array_equal(kl.anchor_kl(pi, ref, "forward"), forward)
    for direction, expected in (("reverse", reverse), ("forward", forward)):
        for estimator in ("k1", "k3"):
            got = _expect_over_actions(pi_logits, ref_logits, estimator, direction)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=f"{estimator} {direction}")


def test_anchor_forward_k1_is_r_log_r():
    log_pi = jnp.array([-0.5, -2.0, -1.0, 0.0, -40.0])
    log_ref = jnp.array([-1.5, -0.25, -1.0, -35.0, 0.0])
    r = np.exp(np.float64(log_ref) - np.float64(log_pi))
    expected = r * np.log(r)
    expected[-1] = np.exp(30.0) * 30.0  # log r = 40 is clipped to 30
    got = kl.anchor_kl_estimate(log_pi, log_ref, "k1", "forward")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(kl._forward_k1(log_ref, log_pi), got)
    # The forward k3 is k1 plus the control variate -(r - 1).
    k3 = kl.anchor_kl_estimate(log_pi[:4], log_ref[:4], "k3", "forward")
    np.testing.assert_allclose(k3, expected[:4] - (r[:4] - 1.0), rtol=1e-5, atol=1e-6)


def test_anchor_k2_is_biased_only_to_third_order():
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        pi_logits = jnp.asarray(rng.normal(size=(3, 5)))
        noise = jnp.asarray(rng.normal(size=(3, 5)))
        assert pi_logits.dtype == jnp.float64

        def bias(eps):
            ref_logits = pi_logits + eps * noise
            e_k2 = _expect_over_actions(pi_logits, ref_logits, "k2", "reverse")
            # k2's own definition, sum_a pi(a) (log pi(a) - log ref(a))^2 / 2, in numpy.
            log_pi = np.asarray(jax.nn.log_softmax(pi_logits))
            log_ref = np.asarray(jax.nn.log_softmax(ref_logits))
            own = np.sum(np.exp(log_pi) * 0.5 * np.square(log_pi - log_ref), axis=-1)
            np.testing.assert_allclose(e_k2, own, rtol=1e-12)
            true_kl = np.asarray(kl.kl_divergence(Categorical(pi_logits), Categorical(ref_logits)))
            return np.max(np.abs(np.asarray(e_k2) - true_kl) / true_kl)

        big, medium, small = bias(2.0), bias(1e-1), bias(1e-2)
        assert small < medium / 5  # relative bias -> 0 linearly in eps: the bias is third order
        assert medium < 0.1
        assert big > 0.1  # far from pi, k2 is a biased estimate of KL(pi || ref)


def test_anchor_estimators_expected_gradients():
    pi_logits, ref_logits = _anchor_logits()
    ref = Categorical(ref_logits)

    # k1 in the reward: the score-function surrogate stop_grad(k1) * log pi, k1 = l.
    def reinforce(log_pi, log_ref):
        k1 = kl.anchor_kl_estimate(log_pi, log_ref, "k1", "reverse")
        return jax.lax.stop_gradient(k1) * log_pi

    @jax.jit
    def grads(theta):
        def grad_of(f):
            return jax.grad(lambda theta: jnp.sum(f(theta)))(theta)

        out = {
            "reverse": grad_of(lambda t: kl.kl_divergence(Categorical(t), ref)),
            "forward": grad_of(lambda t: kl.kl_divergence(ref, Categorical(t))),
            "reward": grad_of(lambda t: _expect_over_actions(t, ref_logits, "", "", reinforce)),
        }
        for e in ("k1", "k2", "k3"):
            out[e] = grad_of(lambda t, e=e: _expect_over_actions(t, ref_logits, e, "reverse"))
        return out

    g = jax.tree.map(np.asarray, grads(pi_logits))
    assert all(np.all(np.isfinite(v)) for v in g.values())
    assert np.max(np.abs(g["reverse"] - g["forward"])) > 0.1  # the two identities differ
    assert np.max(np.abs(g["reward"])) > 0.1
    assert g["reverse"][3, 1] == 0.0 and g["forward"][3, 1] == 0.0  # the masked logit
    # k1 as a loss: E_pi[grad log pi] = 0.
    np.testing.assert_allclose(g["k1"], 0.0, atol=1e-6)
    # k2 as a loss: E_pi[l grad log pi] = grad KL(pi || ref).
    np.testing.assert_allclose(g["k2"], g["reverse"], rtol=1e-5, atol=1e-6)
    # k3 as a loss: E_pi[(1 - ref / pi) grad log pi] = -E_ref[grad log pi] = grad KL(ref || pi).
    np.testing.assert_allclose(g["k3"], g["forward"], rtol=1e-5, atol=1e-6)
    # k1 in the reward (REINFORCE with reward -k1, up to sign): E_pi[l grad log pi].
    np.testing.assert_allclose(g["reward"], g["reverse"], rtol=1e-5, atol=1e-6)


_HERMITE_NODES, _HERMITE_WEIGHTS = np.polynomial.hermite.hermgauss(40)


def _gaussian_quadrature(mean, log_std, ref, estimator, direction):
    """E_{x~pi}[estimate(x)] for 1-D pi = N(mean, exp(log_std)^2), by Gauss-Hermite quadrature.

    The nodes x = mean + sqrt(2) std t are held fixed (stop-gradient), like samples: the
    gradient flows through log pi(x) only. The weights w / sqrt(pi) are constants.
    """
    pi = DiagGaussian(mean, log_std)
    x = jax.lax.stop_gradient(mean + math.sqrt(2.0) * jnp.exp(log_std) * _HERMITE_NODES[:, None])
    values = kl.anchor_kl_estimate(pi.log_prob(x), ref.log_prob(x), estimator, direction)
    return jnp.sum(_HERMITE_WEIGHTS / math.sqrt(math.pi) * values)


_GAUSSIAN_PI = (np.array([0.3]), np.log(np.array([0.8])))
_GAUSSIAN_REF = (np.array([-0.4]), np.log(np.array([0.6])))


def test_anchor_estimators_on_gaussians_by_quadrature():
    with jax.enable_x64(True):
        mean, log_std = (jnp.asarray(a) for a in _GAUSSIAN_PI)
        assert mean.dtype == jnp.float64
        ref = DiagGaussian(*map(jnp.asarray, _GAUSSIAN_REF))

        @jax.jit
        def values(mean, log_std):
            pi = DiagGaussian(mean, log_std)
            out = {"reverse": kl.kl_divergence(pi, ref), "forward": kl.kl_divergence(ref, pi)}
            for e, d in _ESTIMATOR_DIRECTIONS:
                out[f"{e} {d}"] = _gaussian_quadrature(mean, log_std, ref, e, d)
            return out

        v = {k: float(x) for k, x in values(mean, log_std).items()}
    assert abs(v["reverse"] - v["forward"]) > 0.05
    # In float64 the 40-point quadrature is good to ~1e-14 here (k1's integrand is a polynomial).
    for direction in ("reverse", "forward"):
        for estimator in ("k1", "k3"):
            assert v[f"{estimator} {direction}"] == pytest.approx(v[direction], rel=1e-9), (estimator, direction)
    # k2's expectation is its own, E[l^2 / 2], not the KL.
    assert abs(v["k2 reverse"] - v["reverse"]) > 0.05


def test_anchor_estimators_expected_gradients_on_gaussians():
    with jax.enable_x64(True):
        theta = tuple(jnp.asarray(a) for a in _GAUSSIAN_PI)
        ref = DiagGaussian(*map(jnp.asarray, _GAUSSIAN_REF))

        @jax.jit
        def grads(mean, log_std):
            def grad_of(f):
                return jnp.concatenate(jax.grad(f, argnums=(0, 1))(mean, log_std))

            out = {
                "reverse": grad_of(lambda m, s: kl.kl_divergence(DiagGaussian(m, s), ref)),
                "forward": grad_of(lambda m, s: kl.kl_divergence(ref, DiagGaussian(m, s))),
            }
            for e in ("k1", "k2", "k3"):
                out[e] = grad_of(lambda m, s, e=e: _gaussian_quadrature(m, s, ref, e, "reverse"))
            return out

        g = jax.tree.map(np.asarray, grads(*theta))
    assert g["k1"].dtype == np.float64
    assert np.min(np.abs(g["reverse"] - g["forward"])) > 0.1  # d/d mean and d/d log_std differ
    np.testing.assert_allclose(g["k1"], 0.0, atol=1e-12)
    np.testing.assert_allclose(g["k2"], g["reverse"], rtol=1e-9)
    np.testing.assert_allclose(g["k3"], g["forward"], rtol=1e-9)


def test_anchor_penalty_exact_and_at_the_action():
    pi_logits, ref_logits = _anchor_logits()
    gaussians = (
        DiagGaussian(jnp.array([[0.3, -1.0], [0.0, 2.0]]), jnp.array([[-0.2, 0.1], [0.0, 0.5]])),
        DiagGaussian(jnp.array([[0.0, -0.5], [1.0, 1.0]]), jnp.array([[0.3, 0.0], [-0.4, 0.2]])),
        jnp.array([[0.5, -1.2], [0.3, 2.4]]),
    )
    categoricals = (Categorical(pi_logits), Categorical(ref_logits), jnp.array([0, 4, 2, 3]))

    @jax.jit
    def everything(pi, ref, action):
        log_pi, log_ref = pi.log_prob(action), ref.log_prob(action)
        out = {
            "default": kl.anchor_penalty(pi, ref, action),
            "kl reverse": kl.kl_divergence(pi, ref),
            "kl forward": kl.kl_divergence(ref, pi),
            "log_pi": log_pi,
            "log_ref": log_ref,
        }
        for d in ("reverse", "forward"):
            out["exact " + d] = kl.anchor_penalty(pi, ref, action, "exact", d)
            out["anchor_kl " + d] = kl.anchor_kl(pi, ref, d)
        for e, d in _ESTIMATOR_DIRECTIONS:
            out[f"{e} {d}"] = kl.anchor_penalty(pi, ref, action, e, d)
            out[f"estimate {e} {d}"] = kl.anchor_kl_estimate(log_pi, log_ref, e, d)
        return out

    for pi, ref, action in (categoricals, gaussians):
        v = jax.tree.map(np.asarray, everything(pi, ref, action))
        assert v["default"].shape == v["log_pi"].shape == (action.shape[0],)
        assert np.all(np.abs(v["kl reverse"] - v["kl forward"]) > 1e-3)
        np.testing.assert_array_equal(v["default"], v["kl reverse"])
        for d in ("reverse", "forward"):
            np.testing.assert_array_equal(v["exact " + d], v["anchor_kl " + d])
            np.testing.assert_array_equal(v["exact " + d], v["kl " + d])
        # At the action: anchor_kl_estimate of (log pi(a), log ref(a)), and by hand from
        # l = log pi(a) - log ref(a), r = exp(-l).
        log_ratio = v["log_pi"].astype(np.float64) - v["log_ref"]
        r = np.exp(-log_ratio)
        by_hand = {
            "k1 reverse": log_ratio,
            "k2 reverse": 0.5 * log_ratio**2,
            "k3 reverse": r - 1.0 + log_ratio,
            "k1 forward": r * np.log(r),
            "k3 forward": r * np.log(r) - (r - 1.0),
        }
        for e, d in _ESTIMATOR_DIRECTIONS:
            key = f"{e} {d}"
            np.testing.assert_array_equal(v[key], v["estimate " + key])
            np.testing.assert_allclose(v[key], by_hand[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_check_anchor_options():
    for estimator in kl.REF_ESTIMATORS:
        for direction in kl.REF_DIRECTIONS:
            for placement in kl.REF_PLACEMENTS:
                if (estimator, direction) in (("k2", "forward"), ("abs", "forward")):
                    with pytest.raises(ValueError, match="reverse KL only"):
                        kl.check_anchor_options(estimator, direction, placement)
                else:
                    assert kl.check_anchor_options(estimator, direction, placement) is None
    assert kl.check_anchor_options("k3", "reverse") is None  # placement defaults to "loss"
    with pytest.raises(ValueError, match="unknown estimator 'k4'"):
        kl.check_anchor_options("k4", "reverse")
    with pytest.raises(ValueError, match="unknown direction 'backward'"):
        kl.check_anchor_options("k1", "backward")
    with pytest.raises(ValueError, match="unknown placement 'advantage'"):
        kl.check_anchor_options("k1", "reverse", "advantage")
    # The functions that take the options reject the same combinations.
    x = jnp.zeros(3)
    with pytest.raises(ValueError, match="no 'k2' estimator of the forward KL"):
        kl.anchor_kl_estimate(x, x, "k2", "forward")
    with pytest.raises(ValueError, match="no 'exact' estimator"):
        kl.anchor_kl_estimate(x, x, "exact", "reverse")
    with pytest.raises(ValueError, match="unknown KL direction"):
        kl.anchor_kl_estimate(x, x, "k1", "backward")
    c = Categorical(jnp.zeros(3))
    with pytest.raises(ValueError, match="unknown KL direction"):
        kl.anchor_kl(c, c, "backward")


def _ess_float64(log_weights):
    lw = np.ravel(np.asarray(log_weights, np.float64))
    w = np.exp(lw - lw.max())
    return np.sum(w) ** 2 / (lw.size * np.sum(w**2))


def test_effective_sample_size():
    ess = jax.jit(kl.effective_sample_size)
    rows = jax.jit(jax.vmap(kl.effective_sample_size))
    rng = np.random.default_rng(0)
    lw = np.array(
        [
            [0.0, 0.0, 0.0, 0.0],
            [3.7, 3.7, 3.7, 3.7],
            [0.0, -1000.0, -1000.0, -1000.0],  # one weight carries everything: 1 / n
            [5.0, -100.0, 5.0, -100.0],  # two equal weights carry everything: 2 / n
            [500.0, -500.0, 499.0, 0.0],  # exp overflows and underflows float32
            [-500.0, -500.0, 500.0, -500.0],
            *(2.0 * rng.normal(size=(3, 4))),
        ],
        np.float32,
    )
    got = np.asarray(rows(jnp.asarray(lw)))
    assert got[0] == 1.0
    assert got[1] == 1.0  # centred before the logsumexps: constant weights give exactly 1
    assert got[2] == pytest.approx(0.25, rel=1e-6)
    assert got[3] == pytest.approx(0.5, rel=1e-6)
    assert np.all(np.isfinite(got))
    # w / e^500 = [1, 0, 1/e, 0] and [0, 0, 1, 0].
    expected = (1 + math.exp(-1)) ** 2 / (4 * (1 + math.exp(-2)))
    assert expected == pytest.approx(_ess_float64(lw[4]), rel=1e-12)
    assert got[4] == pytest.approx(expected, rel=1e-6)
    assert got[5] == pytest.approx(0.25, rel=1e-6)
    # The direct formula (sum w)^2 / (n sum w^2), in float64, on random weights.
    for row, value in zip(lw[6:], got[6:], strict=True):
        w = np.exp(row.astype(np.float64))
        assert value == pytest.approx(np.sum(w) ** 2 / (w.size * np.sum(w**2)), rel=1e-6)
    # Any shape: n is the total size.
    assert float(ess(jnp.zeros((3, 4)))) == 1.0
    lw = (2.0 * rng.normal(size=(3, 5))).astype(np.float32)
    w = np.exp(lw.astype(np.float64))
    direct = np.sum(w) ** 2 / (w.size * np.sum(w**2))
    assert float(ess(jnp.asarray(lw))) == pytest.approx(direct, rel=1e-6)


def test_effective_sample_size_is_shift_invariant_to_float_precision():
    for c in (3.7, 500.0, -500.0):
        for n in (2, 3, 10):
            assert float(kl.effective_sample_size(jnp.full(n, c))) == 1.0, (c, n)
    lw = jnp.array([0.0, -1.0, 0.5, -3.0])
    shifted = float(kl.effective_sample_size(lw + 500.0))
    assert shifted == pytest.approx(_ess_float64(lw), rel=1e-6)


def test_decoupled_gaussian_kls_by_hand():
    # MPO's and V-MPO's decoupled M-step KLs (Abdolmaleki et al. 2018), direction KL(old || new).
    old = DiagGaussian(jnp.array([[0.0, 1.0]]), jnp.log(jnp.array([[1.0, 2.0]])))
    new = DiagGaussian(jnp.array([[1.0, 0.0]]), jnp.log(jnp.array([[2.0, 0.5]])))
    # Mean part: sum_d (m_old - m_new)^2 / (2 s_old^2) = 1/2 + 1/8.
    np.testing.assert_allclose(kl.decoupled_gaussian_kl(old, new)[0], [0.5 + 0.125], rtol=1e-6)
    # Std part: sum_d log(s_new / s_old) + s_old^2 / (2 s_new^2) - 1/2.
    expected = (math.log(2.0) + 1 / 8 - 0.5) + (math.log(0.25) + 4.0 / (2 * 0.25) - 0.5)
    np.testing.assert_allclose(kl.decoupled_gaussian_kl(old, new)[1], [expected], rtol=1e-6)
    # Each part ignores the other half of `new`, and is the whole KL(old || new) when that half equals old's.
    moved_std = DiagGaussian(new.mean, old.log_std)
    np.testing.assert_allclose(kl.decoupled_gaussian_kl(old, new)[0], kl.kl_old_new(old, moved_std), rtol=1e-6)
    moved_mean = DiagGaussian(old.mean, new.log_std)
    np.testing.assert_allclose(kl.decoupled_gaussian_kl(old, new)[1], kl.kl_old_new(old, moved_mean), rtol=1e-6)
    # The direction: KL(new || old) of the std part differs (log 2 + 4/8 ... swapped roles).
    assert abs(float(kl.decoupled_gaussian_kl(new, old)[1][0]) - expected) > 0.1
