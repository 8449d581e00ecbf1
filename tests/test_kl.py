"""The KL module: closed forms, Monte Carlo, estimator bias, extremes, controllers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kl_rl import kl

floats = st.floats(-5.0, 5.0, allow_nan=False, width=32)
logits_arrays = hnp.arrays(np.float32, st.integers(2, 6), elements=floats)
vectors = hnp.arrays(np.float32, 3, elements=floats)
log_stds = hnp.arrays(np.float32, 3, elements=st.floats(-3.0, 2.0, width=32))


@given(logits_arrays, st.data())
def test_categorical_kl_nonnegative_and_zero_on_itself(logits, data):
    other = data.draw(hnp.arrays(np.float32, logits.shape, elements=floats))
    p, q = kl.Categorical(jnp.asarray(logits)), kl.Categorical(jnp.asarray(other))
    assert float(kl.kl_divergence(p, q)) >= -1e-6
    assert float(kl.kl_divergence(p, p)) == pytest.approx(0.0, abs=1e-6)


@given(vectors, log_stds, vectors, log_stds)
def test_gaussian_kl_nonnegative_and_zero_on_itself(m1, s1, m2, s2):
    p, q = kl.DiagGaussian(jnp.asarray(m1), jnp.asarray(s1)), kl.DiagGaussian(jnp.asarray(m2), jnp.asarray(s2))
    assert float(kl.kl_divergence(p, q)) >= -1e-5
    assert float(kl.kl_divergence(p, p)) == pytest.approx(0.0, abs=1e-6)


def test_closed_forms_by_hand():
    # 1-D Gaussians N(0, 1) and N(1, 2^2): log 2 + (1 + 1) / 8 - 1/2.
    p = kl.DiagGaussian(jnp.array([0.0]), jnp.array([0.0]))
    q = kl.DiagGaussian(jnp.array([1.0]), jnp.log(jnp.array([2.0])))
    assert float(kl.kl_divergence(p, q)) == pytest.approx(np.log(2) + 2 / 8 - 0.5, rel=1e-6)
    # Two actions, p = (0.25, 0.75), q = (0.5, 0.5).
    p = kl.Categorical(jnp.log(jnp.array([0.25, 0.75])))
    q = kl.Categorical(jnp.log(jnp.array([0.5, 0.5])))
    expected = 0.25 * np.log(0.5) + 0.75 * np.log(1.5)
    assert float(kl.kl_divergence(p, q)) == pytest.approx(expected, rel=1e-6)
    # Direction helpers: kl_old_new(old, new) = KL(old || new).
    assert float(kl.kl_old_new(p, q)) == pytest.approx(expected, rel=1e-6)
    assert float(kl.kl_new_old(p, q)) == pytest.approx(0.5 * np.log(2) + 0.5 * np.log(2 / 3), rel=1e-6)


def _mc(p, q, key, n=200_000):
    """Monte Carlo mean and standard error of log p - log q under x ~ p."""
    x = jax.vmap(p.sample)(jax.random.split(key, n))
    diff = np.asarray(p.log_prob(x) - q.log_prob(x), np.float64)
    return diff.mean(), diff.std() / np.sqrt(n)


def test_closed_forms_match_monte_carlo():
    key = jax.random.key(0)
    pairs = [
        (kl.Categorical(jnp.array([0.3, -1.0, 2.0])), kl.Categorical(jnp.array([1.0, 0.5, -0.5]))),
        (
            kl.DiagGaussian(jnp.array([0.5, -1.0]), jnp.array([0.2, -0.3])),
            kl.DiagGaussian(jnp.array([0.0, 0.0]), jnp.array([0.0, 0.4])),
        ),
    ]
    for p, q in pairs:
        mean, se = _mc(p, q, key)
        assert abs(mean - float(kl.kl_divergence(p, q))) < 4 * se, (mean, se)


def test_entropy_closed_forms_and_monte_carlo():
    g = kl.DiagGaussian(jnp.array([0.0, 3.0]), jnp.array([0.5, -1.0]))
    assert float(g.entropy()) == pytest.approx(float(np.sum(np.array([0.5, -1.0]) + 0.5 * np.log(2 * np.pi * np.e))), rel=1e-6)
    c = kl.Categorical(jnp.log(jnp.array([0.2, 0.3, 0.5])))
    assert float(c.entropy()) == pytest.approx(-np.sum(np.array([0.2, 0.3, 0.5]) * np.log([0.2, 0.3, 0.5])), rel=1e-6)
    for d in (g, c):
        x = jax.vmap(d.sample)(jax.random.split(jax.random.key(1), 100_000))
        lp = np.asarray(-d.log_prob(x), np.float64)
        assert abs(lp.mean() - float(d.entropy())) < 4 * lp.std() / np.sqrt(len(lp))


def test_gaussian_log_prob_matches_the_formula():
    d = kl.DiagGaussian(jnp.array([1.0, -2.0]), jnp.array([0.3, -0.7]))
    x = jnp.array([0.2, -1.5])
    std = np.exp([0.3, -0.7])
    expected = np.sum(-0.5 * ((np.array([0.2, -1.5]) - [1.0, -2.0]) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi))
    assert float(d.log_prob(x)) == pytest.approx(expected, rel=1e-6)
    assert d.sample(jax.random.key(0)).shape == (2,) and d.mode().shape == (2,)


def _estimator_samples(p, q, n=400_000):
    """log p(x), log q(x) for x ~ q."""
    x = jax.vmap(q.sample)(jax.random.split(jax.random.key(2), n))
    return p.log_prob(x), q.log_prob(x)


def _mean_se(x):
    x = np.asarray(x, np.float64)
    return x.mean(), x.std() / np.sqrt(len(x))


def test_estimator_bias_as_theory_says():
    # Far apart (KL ~ 0.5): k1, k3 unbiased for KL(q || p); k2 visibly biased; the reverse
    # estimator unbiased for KL(p || q).
    q = kl.DiagGaussian(jnp.array([0.0]), jnp.array([0.0]))
    p = kl.DiagGaussian(jnp.array([1.0]), jnp.array([0.0]))
    log_p, log_q = _estimator_samples(p, q)
    true_qp = float(kl.kl_divergence(q, p))
    true_pq = float(kl.kl_divergence(p, q))
    for est in (kl.kl_k1, kl.kl_k3):
        mean, se = _mean_se(est(log_p, log_q))
        assert abs(mean - true_qp) < 4 * se, (est.__name__, mean, true_qp, se)
    mean, se = _mean_se(kl.kl_k2(log_p, log_q))
    assert mean - true_qp > 20 * se  # E[(log r)^2 / 2] = 0.5 * (1 + 1) / 2 ... = 1.0 vs KL 0.5
    mean, se = _mean_se(kl.kl_reverse_k3(log_p, log_q))
    assert abs(mean - true_pq) < 4 * se
    # Close together (KL ~ 0.005): k2's bias is third order and falls inside its noise.
    p_near = kl.DiagGaussian(jnp.array([0.1]), jnp.array([0.0]))
    log_p, log_q = _estimator_samples(p_near, q)
    mean, se = _mean_se(kl.kl_k2(log_p, log_q))
    assert abs(mean - float(kl.kl_divergence(q, p_near))) < 4 * se
    # k3 has lower variance than k1, and k3 and the reverse estimator are >= 0 per sample.
    assert np.var(kl.kl_k3(log_p, log_q)) < np.var(kl.kl_k1(log_p, log_q))
    assert float(jnp.min(kl.kl_k3(log_p, log_q))) >= 0.0
    assert float(jnp.min(kl.kl_reverse_k3(log_p, log_q))) >= 0.0


def test_categorical_estimators_unbiased():
    q = kl.Categorical(jnp.log(jnp.array([0.6, 0.3, 0.1])))
    p = kl.Categorical(jnp.log(jnp.array([0.2, 0.3, 0.5])))
    log_p, log_q = _estimator_samples(p, q)
    for est, true in ((kl.kl_k1, kl.kl_divergence(q, p)), (kl.kl_k3, kl.kl_divergence(q, p)), (kl.kl_reverse_k3, kl.kl_divergence(p, q))):
        mean, se = _mean_se(est(log_p, log_q))
        assert abs(mean - float(true)) < 4 * se, est.__name__


def test_masked_categoricals_stay_finite_in_value_and_gradient():
    mask = jnp.array([True, False, True, False])
    old_logits, new_logits = jnp.array([0.5, 3.0, -1.0, 2.0]), jnp.array([1.0, 0.0, 0.0, 0.0])
    old = kl.categorical(old_logits, mask)

    def f(logits):
        new = kl.categorical(logits, mask)
        return kl.kl_divergence(old, new) + new.entropy() + new.log_prob(jnp.array(2)) + kl.kl_divergence(new, old)

    value, grad = jax.value_and_grad(f)(new_logits)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[~np.asarray(mask)], 0.0)
    samples = jax.vmap(old.sample)(jax.random.split(jax.random.key(0), 2000))
    assert set(np.unique(np.asarray(samples))) <= {0, 2}
    assert float(old.entropy()) == pytest.approx(float(kl.Categorical(old_logits[jnp.array([0, 2])]).entropy()), rel=1e-6)


@pytest.mark.parametrize("logits", [[50.0, -50.0], [-50.0, 50.0, 0.0], [1e-3, 0.0]])
def test_near_deterministic_categoricals_stay_finite(logits):
    logits = jnp.array(logits)

    def f(l):
        p, q = kl.Categorical(l), kl.Categorical(logits[::-1])
        return kl.kl_divergence(p, q) + kl.kl_divergence(q, p) + p.entropy()

    value, grad = jax.value_and_grad(f)(logits)
    assert np.isfinite(value) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("log_std_p, log_std_q", [(-20.0, 5.0), (5.0, -20.0), (-20.0, -20.0)])
def test_extreme_log_stds_stay_finite(log_std_p, log_std_q):
    def f(params):
        mean, ls_p = params
        p = kl.DiagGaussian(mean, ls_p)
        q = kl.DiagGaussian(jnp.zeros(2), jnp.full(2, log_std_q))
        x = jnp.array([0.3, -0.1])
        return kl.kl_divergence(p, q) + kl.kl_divergence(q, p) + p.entropy() + p.log_prob(x)

    params = (jnp.array([1.0, -1.0]), jnp.full(2, log_std_p))
    value, grads = jax.value_and_grad(f)(params)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)


def test_estimators_finite_for_huge_log_ratios():
    log_p, log_q = jnp.array([0.0, -200.0, 0.0]), jnp.array([-200.0, 0.0, 0.0])
    for est in (kl.kl_k1, kl.kl_k2, kl.kl_k3, kl.kl_reverse_k3):
        value, grad = jax.value_and_grad(lambda lp: jnp.sum(est(lp, log_q)))(log_p)
        assert np.isfinite(value) and np.all(np.isfinite(grad)), est.__name__
    assert float(kl.kl_k3(jnp.array(0.0), jnp.array(0.0))) == 0.0


def test_adaptive_controller_halves_and_doubles():
    ctrl = kl.adaptive_kl_controller(1.0, 0.01)
    state = ctrl.init()
    assert float(ctrl.update(state, jnp.array(0.02)).beta) == 2.0  # > 1.5 x target
    assert float(ctrl.update(state, jnp.array(0.005)).beta) == 0.5  # < target / 1.5
    assert float(ctrl.update(state, jnp.array(0.01)).beta) == 1.0  # in between: unchanged
    assert float(ctrl.update(state, jnp.array(0.0149)).beta) == 1.0


def test_proportional_controller_by_hand():
    ctrl = kl.proportional_kl_controller(0.5, 0.1, horizon=1000.0, k_beta=0.1)
    state = ctrl.init()
    # e = clip(0.15 / 0.1 - 1, -0.2, 0.2) = 0.2; beta = 0.5 * (1 + 0.1 * 0.2 * 256 / 1000)
    assert float(ctrl.update(state, jnp.array(0.15), 256).beta) == pytest.approx(0.5 * (1 + 0.1 * 0.2 * 0.256), rel=1e-6)
    # e = 0.08 / 0.1 - 1 = -0.2 exactly at the clip
    assert float(ctrl.update(state, jnp.array(0.08), 1000).beta) == pytest.approx(0.5 * (1 - 0.02), rel=1e-6)


def test_controllers_accept_traced_hyperparameters():
    @jax.jit
    def run(init_beta, target):
        ctrl = kl.adaptive_kl_controller(init_beta, target)
        return ctrl.update(ctrl.init(), jnp.array(1.0)).beta

    betas = jax.vmap(run)(jnp.array([1.0, 2.0]), jnp.array([0.01, 10.0]))
    np.testing.assert_allclose(betas, [2.0, 1.0])
    fixed = kl.fixed_kl_controller(0.3)
    assert float(fixed.update(fixed.init(), jnp.array(5.0)).beta) == pytest.approx(0.3)


def test_penalties():
    assert float(kl.kl_penalty_loss(0.5, jnp.array([0.2, 0.4]))) == pytest.approx(0.15)
    r = kl.kl_penalized_reward(jnp.array(1.0), jnp.log(0.5), jnp.log(0.25), 0.1)
    assert float(r) == pytest.approx(1.0 - 0.1 * np.log(2.0), rel=1e-6)
