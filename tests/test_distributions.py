"""Distributions: entropy, log-probs, sampling, the mode, masks, pytrees."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from monte_carlo import draw, mean_se

from kl_rl import kl
from kl_rl.distributions import Categorical, DiagGaussian, categorical


def test_entropy_closed_forms_and_monte_carlo():
    g = DiagGaussian(jnp.array([0.0, 3.0]), jnp.array([0.5, -1.0]))
    expected = 0.5 - 1.0 + 2 * 0.5 * math.log(2 * math.pi * math.e)
    assert float(g.entropy()) == pytest.approx(expected, rel=1e-6)
    probs = np.array([0.2, 0.3, 0.5])
    c = Categorical(jnp.log(jnp.asarray(probs)))
    assert float(c.entropy()) == pytest.approx(-np.sum(probs * np.log(probs)), rel=1e-6)
    # A mask leaves the entropy of the allowed actions; a near-deterministic one has ~0.
    masked = categorical(jnp.array([0.0, 9.0, 0.0]), jnp.array([True, False, True]))
    assert float(masked.entropy()) == pytest.approx(math.log(2), rel=1e-6)
    near_deterministic = Categorical(jnp.array([50.0, -50.0]))
    assert float(near_deterministic.entropy()) == pytest.approx(0.0, abs=1e-30)
    for d in (g, c, masked):
        x = draw(d, jax.random.key(1), 200_000)
        mean, se = mean_se(-d.log_prob(x))
        assert abs(mean - float(d.entropy())) < 4 * se + 1e-6


def test_gaussian_log_prob_matches_the_multivariate_density():
    mean, std = np.array([1.0, -2.0, 0.0]), np.exp([0.3, -0.7, 1.5])
    x = np.array([0.2, -1.5, 3.0])
    cov = np.diag(std**2)
    d = x - mean
    expected = -0.5 * (d @ np.linalg.inv(cov) @ d + np.linalg.slogdet(2 * np.pi * cov)[1])
    dist = DiagGaussian(jnp.asarray(mean, jnp.float32), jnp.log(jnp.asarray(std, jnp.float32)))
    assert float(dist.log_prob(jnp.asarray(x, jnp.float32))) == pytest.approx(expected, rel=1e-6)
    # log_std broadcasts against mean: a shared [D] log-std for a [B, D] batch.
    batch = DiagGaussian(jnp.zeros((5, 3)), jnp.log(jnp.asarray(std, jnp.float32)))
    assert batch.log_prob(jnp.zeros((5, 3))).shape == (5,) and batch.entropy().shape == (5,)


def test_sample_and_mode_shapes_and_moments():
    key = jax.random.key(3)
    g = DiagGaussian(jnp.zeros((4, 2)) + jnp.array([1.0, -3.0]), jnp.log(jnp.array([0.5, 2.0])))
    assert g.sample(key).shape == (4, 2) and g.mode().shape == (4, 2)
    c = Categorical(jnp.zeros((4, 6)).at[:, 2].set(3.0))
    assert c.sample(key).shape == (4,) and c.sample(key).dtype == jnp.int32
    np.testing.assert_array_equal(c.mode(), [2, 2, 2, 2])
    unbatched = DiagGaussian(jnp.array([1.0, -3.0]), jnp.log(jnp.array([0.5, 2.0])))
    x = np.asarray(draw(unbatched, key, 100_000))
    assert np.all(np.abs(x.mean(0) - [1.0, -3.0]) < 4 * np.array([0.5, 2.0]) / math.sqrt(len(x)))
    np.testing.assert_allclose(x.std(0), [0.5, 2.0], rtol=0.01)


def test_categorical_log_prob_broadcasts_and_sample_frequencies_match_probs():
    probs = np.array([0.1, 0.6, 0.3])
    c = Categorical(jnp.log(jnp.asarray(probs)))
    np.testing.assert_allclose(c.log_prob(jnp.array([0, 1, 2])), np.log(probs), rtol=1e-6)
    batch = Categorical(jnp.log(jnp.tile(jnp.asarray(probs), (2, 1))))
    assert batch.log_prob(jnp.array(1)).shape == (2,)
    np.testing.assert_allclose(c.probs, probs, rtol=1e-6)
    n = 100_000
    freq = np.bincount(np.asarray(draw(c, jax.random.key(4), n)), minlength=3) / n
    assert np.all(np.abs(freq - probs) < 4 * np.sqrt(probs * (1 - probs) / n))


def test_masked_actions_are_never_sampled_or_chosen():
    mask = jnp.array([[True, False, True, False], [False, False, False, True]])
    c = categorical(jnp.array([[0.5, 30.0, -1.0, 30.0], [9.0, 9.0, 9.0, -9.0]]), mask)
    samples = np.asarray(jax.vmap(c.sample)(jax.random.split(jax.random.key(0), 20_000)))
    assert set(np.unique(samples[:, 0])) == {0, 2}
    assert set(np.unique(samples[:, 1])) == {3}
    np.testing.assert_array_equal(c.mode(), [0, 3])
    np.testing.assert_array_equal(c.log_prob(jnp.array([1, 0])), [-np.inf, -np.inf])
    expected = [np.log(1 / (1 + np.exp(-1.5))), 0.0]
    np.testing.assert_allclose(c.log_prob(jnp.array([0, 3])), expected, rtol=1e-6)


def test_distributions_are_pytrees():
    g = DiagGaussian(jnp.zeros((3, 2)), jnp.zeros((3, 2)))
    stacked = jax.tree.map(lambda *x: jnp.stack(x), g, g)
    assert isinstance(stacked, DiagGaussian) and stacked.mean.shape == (2, 3, 2)

    def step(total, dist):
        return total + kl.kl_divergence(dist, Categorical(jnp.zeros(2))), None

    logits = jnp.log(jnp.array([[0.5, 0.5], [0.25, 0.75]]))
    total, _ = jax.lax.scan(step, jnp.zeros(()), Categorical(logits))
    assert float(total) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-6)
