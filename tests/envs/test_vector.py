"""VecEnv: independent autoreset, terminated vs truncated, episode statistics, any FuncEnv."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium.envs.phys2d.cartpole import CartPoleFunctional
from gymnasium.envs.phys2d.pendulum import PendulumFunctional

from kl_rl import envs
from kl_rl.envs import VecEnv


def _run(vec, actions, seed=0):
    """Steps `vec` through actions [T, N, ...]; returns the StepOuts stacked over time."""
    reset_key, step_key = jax.random.split(jax.random.key(seed))
    state = vec.reset(reset_key)

    def step(state, xs):
        k, a = xs
        state, out = vec.step(k, state, a)
        return state, out

    return jax.jit(lambda s: jax.lax.scan(step, s, (jax.random.split(step_key, len(actions)), actions)))(state)


def test_cartpole_constant_push_terminates_without_truncating():
    vec = VecEnv(envs.make("CartPole-v1"), 4)
    _, out = _run(vec, jnp.ones((60, 4), jnp.int32))
    terminated, truncated = np.asarray(out.terminated), np.asarray(out.truncated)
    assert terminated.any(axis=0).all() and not truncated.any()
    first = terminated.argmax(axis=0)
    np.testing.assert_array_equal(np.asarray(out.episode_length)[first, range(4)], first + 1)
    np.testing.assert_array_equal(np.asarray(out.episode_return)[first, range(4)], first + 1.0)


def test_pendulum_truncates_at_its_time_limit_and_never_terminates():
    vec = VecEnv(envs.make("Pendulum-v1"), 3)
    _, out = _run(vec, jnp.zeros((450, 3, 1)))
    truncated = np.asarray(out.truncated)
    assert not np.asarray(out.terminated).any()
    np.testing.assert_array_equal(np.nonzero(truncated[:, 0])[0], [199, 399])
    assert truncated.all(axis=1).sum() == 2  # all envs in lockstep
    np.testing.assert_array_equal(np.asarray(out.episode_length)[199], 200)


def test_termination_on_the_last_allowed_step_is_not_truncation():
    # CartPole pushed one way terminates after a few steps; a time limit of exactly that
    # length must report terminated, not truncated.
    env = envs.make("CartPole-v1")
    _, free = _run(VecEnv(env, 1), jnp.ones((60, 1), jnp.int32))
    steps = int(np.asarray(free.terminated)[:, 0].argmax()) + 1
    _, capped = _run(VecEnv(env, 1, max_episode_steps=steps), jnp.ones((60, 1), jnp.int32))
    assert bool(capped.terminated[steps - 1, 0]) and not bool(capped.truncated[steps - 1, 0])
    _, shorter = _run(VecEnv(env, 1, max_episode_steps=steps - 1), jnp.ones((60, 1), jnp.int32))
    assert bool(shorter.truncated[steps - 2, 0]) and not bool(shorter.terminated[steps - 2, 0])


def test_autoreset_only_touches_envs_that_ended_and_final_obs_is_the_true_next_obs():
    env = envs.make("CartPole-v1")
    vec = VecEnv(env, 2)
    # Env 0 is pushed right (terminates early); env 1 alternates (survives 20 steps).
    actions = jnp.stack([jnp.ones(20, jnp.int32), jnp.arange(20) % 2], axis=1)
    state0 = vec.reset(jax.random.split(jax.random.key(3))[0])  # the reset _run does
    _, out = _run(vec, actions, seed=3)
    done = np.asarray(out.terminated | out.truncated)
    assert done[:, 0].any() and not done[:, 1].any()
    # Env 1 follows the single-env dynamics from its initial state, step for step.
    s = state0.env_state[1]
    for t in range(20):
        s = env.transition(s, actions[t, 1])
        np.testing.assert_allclose(out.obs[t, 1], s, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(out.final_obs[t, 1], out.obs[t, 1])
    t_end = int(np.argmax(done[:, 0]))
    assert not np.allclose(out.final_obs[t_end, 0], out.obs[t_end, 0])
    assert abs(float(out.final_obs[t_end, 0, 0])) > 2.4 or abs(float(out.final_obs[t_end, 0, 2])) > 0.2094
    assert np.all(np.abs(np.asarray(out.obs[t_end, 0])) <= 0.05)  # a fresh initial state


def test_episode_statistics_match_a_manual_loop():
    vec = VecEnv(envs.make("MountainCarContinuous-v0"), 2, max_episode_steps=25)
    actions = jax.random.uniform(jax.random.key(1), (80, 2, 1), minval=-1.5, maxval=1.5)
    _, out = _run(vec, actions)
    reward, done = np.asarray(out.reward), np.asarray(out.terminated | out.truncated)
    for i in range(2):
        total, length = 0.0, 0
        for t in range(80):
            total += reward[t, i]
            length += 1
            if done[t, i]:
                assert out.episode_return[t, i] == pytest.approx(total, rel=1e-5)
                assert int(out.episode_length[t, i]) == length
                total, length = 0.0, 0
            else:
                assert out.episode_return[t, i] == 0 and out.episode_length[t, i] == 0
    np.testing.assert_array_equal(np.nonzero(done[:, 0])[0], [24, 49, 74])


@pytest.mark.parametrize(
    "env_cls, action", [(CartPoleFunctional, jnp.zeros(3, jnp.int32)), (PendulumFunctional, jnp.zeros((3, 1)))]
)
def test_accepts_gymnasiums_own_phys2d_func_envs(env_cls, action):
    vec = VecEnv(env_cls(), 3, max_episode_steps=30)
    _, out = _run(vec, jnp.broadcast_to(action, (70, *action.shape)))
    assert out.obs.dtype == jnp.float32 and out.reward.shape == (70, 3)
    done = np.asarray(out.terminated | out.truncated)
    assert done.any()
    if env_cls is PendulumFunctional:
        np.testing.assert_array_equal(np.nonzero(np.asarray(out.truncated)[:, 0])[0], [29, 59])


def test_same_key_same_bits_and_vmap_over_keys():
    vec = VecEnv(envs.make("Acrobot-v1"), 4)
    actions = jax.random.randint(jax.random.key(2), (50, 4), 0, 3)
    _, a = _run(vec, actions, seed=7)
    _, b = _run(vec, actions, seed=7)
    np.testing.assert_array_equal(a.obs, b.obs)
    batched = jax.jit(jax.vmap(lambda k: vec.reset(k).obs))(jax.random.split(jax.random.key(0), 5))
    assert batched.shape == (5, 4, 6)
    assert not np.allclose(batched[0], batched[1])
