"""CEM: fitness from first episodes, elites, decaying noise, kept elites and the KL trust region."""

import jax
import jax.numpy as jnp
import numpy as np

from kl_rl import buffer, kl
from kl_rl.agents.cem import first_episode_returns, pull_back
from kl_rl.distributions import DiagGaussian
from kl_rl.agents.base import UpdateContext

from .common import train

FIELDS = dict(iterations=6, population_size=16)


def test_first_episode_returns_stop_at_the_first_end():
    reward = jnp.array([[1.0, 1.0], [2.0, 1.0], [4.0, 1.0]])
    terminated = jnp.array([[False, False], [True, False], [False, False]])
    truncated = jnp.array([[False, False], [False, False], [False, True]])
    traj = buffer.Transition(None, None, reward, terminated, truncated, None, None, None, None)
    np.testing.assert_array_equal(first_episode_returns(traj), [3.0, 3.0])


def test_pull_back_meets_the_kl_bound_and_leaves_close_steps_alone():
    old = DiagGaussian(jnp.zeros(5), jnp.zeros(5))
    far = DiagGaussian(jnp.full(5, 2.0), jnp.full(5, -1.0))
    pulled, alpha = pull_back(old, far, 0.1)
    value = kl.kl_divergence(old, pulled)
    assert 0 < alpha < 1
    assert value <= 0.1 and value > 0.099  # the largest step within the bound, not any step
    near = DiagGaussian(jnp.full(5, 0.01), jnp.zeros(5))
    same, alpha = pull_back(old, near, 0.1)
    assert alpha == 1
    np.testing.assert_array_equal(same.mean, near.mean)


def test_trust_region_bounds_every_search_step():
    free = train("cem", **FIELDS)
    bounded = train("cem", trust_kl=0.5, **FIELDS)
    assert np.max(free.metrics["kl"]) > 0.5  # the bound binds
    assert np.all(bounded.metrics["kl"] <= 0.5 * (1 + 1e-5))
    assert np.any(bounded.metrics["trust_alpha"] < 1)


def test_noise_decays_linearly_to_zero():
    out = train("cem", noise_init=0.3, noise_decay=0.1, **FIELDS)
    np.testing.assert_allclose(out.metrics["extra_var"][0], [0.3, 0.2, 0.1, 0.0, 0.0, 0.0], atol=1e-6)


def test_kept_elites_rejoin_the_population_through_the_buffer():
    from kl_rl import envs
    from kl_rl.agents import ALGOS

    env = envs.make("CartPole-v1")
    config = ALGOS["cem"].config(population_size=8, elite_frac=0.5, keep_elites=2)
    agent = ALGOS["cem"].make(config, env.observation_space, env.action_space)
    state = agent.init(jax.random.key(0))
    reward = jnp.tile(jnp.arange(8.0), (3, 1))  # member m earns 3m before its episode ends
    traj = buffer.Transition(
        None, None, reward, jnp.zeros((3, 8), bool), jnp.array([[0] * 8, [0] * 8, [1] * 8], bool),
        None, None, None, None,
    )  # fmt: skip
    new_state, metrics = agent.update(jax.random.key(1), state, traj, UpdateContext(jnp.zeros(())))
    np.testing.assert_array_equal(new_state.population[-2:], state.population[jnp.array([7, 6])])
    np.testing.assert_array_equal(new_state.elites.data["fitness"], [21.0, 18.0])
    assert metrics["fitness_best"] == 21.0 and metrics["fitness_elite"] == (21 + 18 + 15 + 12) / 4
    # The search mean is the mean of the 4 elites (members 7, 6, 5, 4).
    np.testing.assert_allclose(new_state.search.mean, state.population[4:].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_cem_solves_cartpole_in_a_few_iterations():
    out = train("cem", seeds=2, iterations=12, population_size=32, episodes_per_member=2)
    assert np.all(out.metrics["fitness_best"][:, -1] >= 400)
    assert np.median(out.eval_returns.mean(-1)) >= 300
