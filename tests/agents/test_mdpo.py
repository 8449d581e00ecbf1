"""MDPO: the loss against the paper's objective written out, the KL's direction, the step-size
schedule, its metrics and a small learning check."""

import functools

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kl_rl.agents.mdpo import MDPOConfig, mdpo_coef, mdpo_loss
from kl_rl.distributions import Categorical, DiagGaussian
from kl_rl.errors import ConfigError
from kl_rl.presets import preset

from .common import train

pytestmark = pytest.mark.xdist_group("test_mdpo")

SMALL = dict(total_steps=4096, num_envs=4, num_steps=64, num_minibatches=4, update_epochs=2)

# Two states, three actions: pi (being optimized) and pi_k (the previous iterate) differ
# asymmetrically, so KL(pi || pi_k) and KL(pi_k || pi) differ by far more than the tolerance.
PI = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
PI_K = np.array([[0.4, 0.4, 0.2], [0.5, 0.25, 0.25]])
ACTIONS = np.array([0, 2])
ADV = np.array([1.5, -0.5])


def _categorical(p):
    return Categorical(jnp.log(jnp.asarray(p, jnp.float32)))


def _kl(p, q):
    return np.sum(p * np.log(p / q), axis=-1)


def _inputs():
    log_ratio = jnp.log(PI[[0, 1], ACTIONS] / PI_K[[0, 1], ACTIONS]).astype(jnp.float32)
    return log_ratio, jnp.asarray(ADV, jnp.float32), _categorical(PI), _categorical(PI_K)


def test_mdpo_loss_is_the_papers_objective_written_out():
    # -(1/B) sum_i (pi(a_i|s_i) / pi_k(a_i|s_i)) A_i + (1/t_k) (1/B) sum_i KL(pi(.|s_i) || pi_k(.|s_i))
    coef = 2.5
    ratio = PI[[0, 1], ACTIONS] / PI_K[[0, 1], ACTIONS]
    surrogate = -np.mean(ratio * ADV)
    expected = surrogate + coef * np.mean(_kl(PI, PI_K))
    loss, surr, kl_term = mdpo_loss(*_inputs(), coef)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(surr, surrogate, rtol=1e-5)
    np.testing.assert_allclose(kl_term, np.mean(_kl(PI, PI_K)), rtol=1e-5)
    weight = jnp.array([0.5, 1.0])
    loss, surr, _ = mdpo_loss(*_inputs(), coef, weight)
    np.testing.assert_allclose(surr, -np.mean(np.array([0.5, 1.0]) * ratio * ADV), rtol=1e-5)


def test_mdpo_kl_is_reverse_kl_of_the_optimized_policy_from_the_previous_iterate():
    # KL(pi_theta || pi_k), not PPO-penalty's KL(pi_k || pi_theta): the two differ here by > 10%.
    reverse, forward = np.mean(_kl(PI, PI_K)), np.mean(_kl(PI_K, PI))
    assert abs(reverse - forward) > 0.1 * reverse
    _, _, kl_term = mdpo_loss(*_inputs(), 1.0)
    np.testing.assert_allclose(kl_term, reverse, rtol=1e-5)
    # Gaussians: KL(N(0, 1) || N(0, 2^2)) = log 2 + 1/8 - 1/2; the other way 2 - log 2 - 1/2.
    pi = DiagGaussian(jnp.zeros((1, 1)), jnp.zeros((1, 1)))
    pi_k = DiagGaussian(jnp.zeros((1, 1)), jnp.full((1, 1), np.log(2.0)))
    _, _, kl_term = mdpo_loss(jnp.zeros(1), jnp.zeros(1), pi, pi_k, 1.0)
    np.testing.assert_allclose(kl_term, np.log(2.0) + 1 / 8 - 1 / 2, rtol=1e-5)
    # Its gradient: d/dlogits_pi of KL(pi || pi_k) = pi * (log pi - log pi_k - KL) per state.
    grad = jax.grad(lambda logits: mdpo_loss(jnp.zeros(2), jnp.zeros(2), Categorical(logits), _categorical(PI_K),
                                             1.0)[0])(jnp.log(jnp.asarray(PI, jnp.float32)))  # fmt: skip
    expected = PI * (np.log(PI / PI_K) - _kl(PI, PI_K)[:, None]) / 2
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_step_size_is_annealed_to_zero_so_the_coefficient_grows():
    np.testing.assert_allclose(mdpo_coef(0.5, jnp.asarray(0.0), True), 2.0)
    np.testing.assert_allclose(mdpo_coef(0.5, jnp.asarray(0.75), True), 8.0)
    np.testing.assert_allclose(mdpo_coef(0.5, jnp.asarray(0.75), False), 2.0)


def test_bad_step_size_is_a_config_error():
    with pytest.raises(ConfigError, match="step_size"):
        MDPOConfig(step_size=0.0).validate(gym.spaces.Discrete(2))


@functools.cache
def _smoke_run():
    """Two seeds of 64 updates at the CartPole preset with half its epochs, shared by two tests
    (the file runs on one pytest-xdist worker)."""
    return train("mdpo", seeds=2, **dict(preset("mdpo", "CartPole-v1"), **SMOKE))


SMOKE = dict(total_steps=16_384, update_epochs=10)


def test_run_logs_the_kl_term_and_the_coefficient_per_update():
    out = _smoke_run()
    num_updates = SMOKE["total_steps"] // (8 * 32)
    coef = np.asarray(out.metrics["mdpo_coef"])
    np.testing.assert_allclose(coef, np.broadcast_to(1.0 / (1.0 - np.arange(num_updates) / num_updates), coef.shape),
                               rtol=1e-5)  # fmt: skip
    for name in ("mdpo_kl", "surrogate", "pg_loss", "kl", "vf_loss"):
        assert np.all(np.isfinite(out.metrics[name])), name
    assert np.all(out.metrics["mdpo_kl"] >= 0) and np.any(out.metrics["mdpo_kl"] > 0)
    np.testing.assert_allclose(
        out.metrics["pg_loss"], out.metrics["surrogate"] + out.metrics["mdpo_coef"] * out.metrics["mdpo_kl"],
        rtol=1e-4, atol=1e-6,
    )  # fmt: skip


def test_mdpo_learns_cartpole_beyond_a_random_policy():
    # A random policy balances about 22 steps. These two seeds reached 114 and 130; the check
    # asks for more than three times random.
    returns = np.asarray(_smoke_run().eval_returns).mean(axis=1)
    assert np.min(returns) >= 75, returns


@pytest.mark.slow
def test_mdpo_solves_cartpole_at_its_preset():
    out = train("mdpo", seeds=4, **preset("mdpo", "CartPole-v1"))
    returns = np.asarray(out.eval_returns).mean(axis=1)
    assert np.median(returns) >= 475, returns
