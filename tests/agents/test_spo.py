"""PPO with SPO's surrogate (Xie et al. 2025): the loss against its equation, against the clip, and
an update on ratios beyond the clip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kl_rl.agents.ppo import PPOConfig, clipped_surrogate_loss, spo_surrogate_loss
from kl_rl.errors import ConfigError

from .common import bandit_batch, made_agent

pytestmark = pytest.mark.xdist_group("test_spo")

SMALL = dict(total_steps=4096, num_envs=4, num_steps=64, num_minibatches=4, update_epochs=2, ent_coef=0.0)
EPS = 0.2


def test_spo_loss_hand_values():
    # r A - |A| / (2 eps) (r - 1)^2 with eps 0.2, so |A| / (2 eps) = 2.5 |A|:
    # r 1.5, A +1: 1.5 - 2.5 * 0.25 = 0.875; r 0.5, A -1: -0.5 - 2.5 * 0.25 = -1.125;
    # r 1.1, A +2: 2.2 - 5 * 0.01 = 2.15.
    log_ratio = jnp.log(jnp.array([1.5, 0.5, 1.1]))
    adv = jnp.array([1.0, -1.0, 2.0])
    np.testing.assert_allclose(spo_surrogate_loss(log_ratio, adv, EPS), -(0.875 - 1.125 + 2.15) / 3, rtol=1e-6)
    weight = jnp.array([0.5, 1.0, 0.0])
    np.testing.assert_allclose(
        spo_surrogate_loss(log_ratio, adv, EPS, weight), -(0.5 * 0.875 - 1.125) / 3, rtol=1e-6
    )


def test_spo_equals_clip_at_ratio_one_and_differs_outside_the_clip_range():
    adv = jnp.array([1.0, -1.0, 2.0, -0.5])
    np.testing.assert_allclose(
        spo_surrogate_loss(jnp.zeros(4), adv, EPS), clipped_surrogate_loss(jnp.zeros(4), adv, EPS), rtol=1e-6
    )
    for ratio in (1.5, 0.5, 1.0 + 2 * EPS, 1.0 - 2 * EPS):
        log_ratio = jnp.full(4, jnp.log(ratio))
        spo, clip = spo_surrogate_loss(log_ratio, adv, EPS), clipped_surrogate_loss(log_ratio, adv, EPS)
        assert abs(float(spo) - float(clip)) > 1e-3, ratio


@pytest.mark.parametrize("ratio", [1.5, 1.3, 0.7, 0.5])
@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_spo_gradient_pulls_a_ratio_outside_the_clip_range_back_toward_one(ratio, advantage):
    # d loss / d r has the sign of r - 1, so a descent step moves r toward 1, whichever way the
    # advantage points; the clip's gradient on the favoured side is zero.
    def loss(r, fn):
        return fn(jnp.log(r)[None], jnp.array([advantage]), EPS)

    grad = jax.grad(loss)(jnp.asarray(ratio), spo_surrogate_loss)
    assert np.sign(grad) == np.sign(ratio - 1.0), grad
    favoured = (ratio > 1.0) == (advantage > 0)
    if favoured:
        assert jax.grad(loss)(jnp.asarray(ratio), clipped_surrogate_loss) == 0.0


@pytest.mark.parametrize("advantage", [1.0, -3.0])
def test_spo_objective_peaks_at_the_favoured_edge_of_the_clip_range(advantage):
    # The parabola's top: r = 1 + sign(A) eps.
    grad = jax.grad(lambda r: spo_surrogate_loss(jnp.log(r)[None], jnp.array([advantage]), EPS))
    np.testing.assert_allclose(grad(jnp.asarray(1.0 + np.sign(advantage) * EPS)), 0.0, atol=1e-6)


def test_an_spo_update_moves_the_policy_where_the_clip_leaves_it():
    # test_ppo's batch with every ratio beyond the clip on the side its advantage favours: the
    # clipped surrogate has no gradient there and leaves the policy (tested in test_ppo); SPO's
    # pulls the ratios back.
    _, agent, update = made_agent("ppo", surrogate="spo", **SMALL)
    state = agent.init(jax.random.key(0))
    traj = bandit_batch(agent, state)
    beyond = traj._replace(log_prob=traj.log_prob + jnp.where(traj.action == 0, -0.5, 0.5))
    new, metrics = update(jax.random.key(1), state, beyond, jnp.zeros(()))
    assert metrics["clip_frac"] == 1.0
    before, after = jax.tree.leaves(state.params["policy"]), jax.tree.leaves(new.params["policy"])
    assert max(np.max(np.abs(a - b)) for a, b in zip(before, after, strict=True)) > 1e-4
    # ... toward ratio 1: the paying action's probability falls back toward its behaviour value.
    old_p0 = np.exp(agent.policy(state, beyond.obs[0]).log_prob(jnp.zeros(64, jnp.int32)))
    new_p0 = np.exp(agent.policy(new, beyond.obs[0]).log_prob(jnp.zeros(64, jnp.int32)))
    assert np.all(new_p0 < old_p0), (old_p0[:2], new_p0[:2])


def test_unknown_surrogate_is_a_config_error():
    import gymnasium as gym

    with pytest.raises(ConfigError, match="surrogate"):
        PPOConfig(surrogate="spo2").validate(gym.spaces.Discrete(2))
    PPOConfig(surrogate="spo").validate(gym.spaces.Discrete(2))
