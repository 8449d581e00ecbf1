"""Networks: the LAPACK-free orthogonal initializer and the policy heads."""

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kl_rl import networks
from kl_rl.distributions import DiagGaussian


@pytest.mark.parametrize("shape", [(4, 64), (64, 64), (64, 2), (64, 1), (3, 5, 7)])
def test_orthogonal_rows_or_columns_are_orthonormal(shape):
    w = np.asarray(networks.orthogonal(1.5)(jax.random.key(0), shape), np.float64).reshape(-1, shape[-1])
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    np.testing.assert_allclose(gram, 1.5**2 * np.eye(len(gram)), atol=2e-5)


def test_orthogonal_matches_the_qr_distribution():
    # Haar-distributed orthogonal matrices have E[W_ij^2] = 1/n and E[trace W] = 0.
    ws = jax.vmap(lambda k: networks.orthogonal()(k, (8, 8)))(jax.random.split(jax.random.key(1), 4000))
    ws = np.asarray(ws, np.float64)
    np.testing.assert_allclose((ws**2).mean(axis=0), 1 / 8, atol=0.01)
    traces = np.trace(ws, axis1=1, axis2=2)
    assert abs(traces.mean()) < 4 * traces.std() / np.sqrt(len(traces))
    # Same recipe as flax's QR-based initializer: both give Q with positive R-diagonal.
    a = jax.random.normal(jax.random.key(2), (6, 6))
    q, r = np.linalg.qr(np.asarray(a, np.float64))
    q = q * np.sign(np.diag(r))
    ours = np.asarray(networks.orthogonal()(jax.random.key(2), (6, 6)))
    np.testing.assert_allclose(ours, q, atol=1e-5)


def test_heads_give_the_right_distributions():
    obs = jnp.zeros((5, 3))
    box = gym.spaces.Box(-1.0, 1.0, (2,))
    gauss = networks.make_policy(box, (16,), "tanh", init_log_std=-0.5)
    dist = gauss.apply(gauss.init(jax.random.key(0), obs), obs)
    assert isinstance(dist, DiagGaussian) and dist.mean.shape == (5, 2)
    np.testing.assert_allclose(dist.log_std, -0.5)
    cat = networks.make_policy(gym.spaces.Discrete(4), (16,), "relu")
    assert cat.apply(cat.init(jax.random.key(0), obs), obs).logits.shape == (5, 4)
