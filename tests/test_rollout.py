"""The collector: what `rollout.collect` records for each step."""

import jax
import jax.numpy as jnp
import numpy as np

from kl_rl import distributions, envs, rollout
from kl_rl.envs import VecEnv


def test_next_obs_is_the_step_s_own_next_observation_also_where_an_episode_ended():
    # A truncated step bootstraps from V(next_obs) (`buffer.gae`), so next_obs must be where the
    # step led, not the next episode's first observation, which is what the policy sees next.
    env = envs.make("CartPole-v1")  # its observation is its state
    vec = VecEnv(env, 6, max_episode_steps=20)
    start = rollout.init_collector(vec.reset(jax.random.key(0)), vec.observation_space.shape)

    def act(key, obs):
        dist = distributions.categorical(jnp.zeros((obs.shape[0], 2)))
        action = dist.sample(key)
        return action, dist.log_prob(action), dist

    _, traj, _ = jax.jit(lambda key, state: rollout.collect(key, act, vec, state, 60, False))(jax.random.key(1), start)
    obs, next_obs, action = np.asarray(traj.obs), np.asarray(traj.next_obs), np.asarray(traj.action)
    terminated, truncated = np.asarray(traj.terminated), np.asarray(traj.truncated)
    assert terminated.any() and truncated.any()
    want = jax.jit(jax.vmap(jax.vmap(env.transition)))(obs, action)
    np.testing.assert_allclose(next_obs, want, rtol=1e-6, atol=1e-6)
    # Where an episode ended, the observation the policy acts on next is another one: a reset.
    done = (terminated | truncated)[:-1]
    assert np.all(np.any(next_obs[:-1][done] != obs[1:][done], axis=-1))
    np.testing.assert_array_equal(next_obs[:-1][~done], obs[1:][~done])
