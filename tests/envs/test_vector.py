"""VecEnv: independent autoreset, terminated vs truncated, episode statistics, any FuncEnv."""

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium.envs.phys2d.cartpole import CartPoleFunctional
from gymnasium.envs.phys2d.pendulum import PendulumFunctional

from kl_rl import envs
from kl_rl.envs import VecEnv
from kl_rl.errors import ConfigError


def _rollout(vec, actions):
    """A jitted function of a key: resets `vec` and steps it through `actions` [T, N, ...].

    Returns:
      The states before each step and the StepOuts, both stacked over time, and the last state.
    """

    def rollout(key):
        reset_key, step_key = jax.random.split(key)

        def step(state, xs):
            key, action = xs
            next_state, out = vec.step(key, state, action)
            return next_state, (state, out)

        step_keys = jax.random.split(step_key, len(actions))
        last, (states, outs) = jax.lax.scan(step, vec.reset(reset_key), (step_keys, actions))
        return states, outs, last

    return jax.jit(rollout)


def test_autoreset_resets_only_the_envs_that_ended_the_others_step_on():
    env = envs.make("CartPole-v1")
    vec = VecEnv(env, 6, max_episode_steps=20)
    actions = jax.random.bernoulli(jax.random.key(1), 0.5, (60, 6)).astype(jnp.int32)
    states, out, _ = jax.tree.map(np.asarray, _rollout(vec, actions)(jax.random.key(0)))
    env_state, time, terminated, truncated = states.env_state, states.time, out.terminated, out.truncated
    done = terminated | truncated
    # The run mixes terminations and truncations, and steps where some envs end and others do not.
    assert terminated.any() and truncated.any() and not (terminated & truncated).any()
    assert np.any(done.any(axis=1) & ~done.all(axis=1))

    @jax.jit
    def single_step(s_t, a_t):
        s_tp1 = env.transition(s_t, a_t)
        return s_tp1, env.observation(s_tp1), env.reward(s_t, a_t, s_tp1), env.terminal(s_tp1)

    for t in range(len(actions) - 1):
        for i in range(6):
            next_state, obs, reward, term = map(np.asarray, single_step(env_state[t, i], int(actions[t, i])))
            np.testing.assert_allclose(out.final_obs[t, i], obs, rtol=1e-6, atol=1e-6)
            assert out.reward[t, i] == reward and terminated[t, i] == term
            assert truncated[t, i] == (time[t, i] + 1 == 20 and not term)
            if done[t, i]:
                # A fresh episode: a new initial state, and its observation to act on next.
                assert time[t + 1, i] == 0 and np.all(np.abs(env_state[t + 1, i]) <= 0.05)
                np.testing.assert_array_equal(out.obs[t, i], env_state[t + 1, i])
                assert not np.allclose(out.final_obs[t, i], out.obs[t, i])
            else:
                assert time[t + 1, i] == time[t, i] + 1
                np.testing.assert_allclose(env_state[t + 1, i], next_state, rtol=1e-6, atol=1e-6)
                np.testing.assert_array_equal(out.obs[t, i], out.final_obs[t, i])


def test_cartpole_pushed_one_way_terminates_and_never_truncates():
    vec = VecEnv(envs.make("CartPole-v1"), 4)
    assert vec.max_episode_steps == 500
    _, out, _ = _rollout(vec, jnp.ones((60, 4), jnp.int32))(jax.random.key(0))
    terminated, truncated = np.asarray(out.terminated), np.asarray(out.truncated)
    assert terminated.any(axis=0).all() and not truncated.any()
    first = terminated.argmax(axis=0)
    np.testing.assert_array_equal(np.asarray(out.episode_length)[first, range(4)], first + 1)
    np.testing.assert_array_equal(np.asarray(out.episode_return)[first, range(4)], first + 1.0)


def test_pendulum_truncates_at_200_steps_and_never_terminates():
    vec = VecEnv(envs.make("Pendulum-v1"), 3)
    assert vec.max_episode_steps == 200
    _, out, _ = _rollout(vec, jnp.zeros((450, 3, 1)))(jax.random.key(0))
    truncated = np.asarray(out.truncated)
    assert not np.asarray(out.terminated).any()
    for i in range(3):
        np.testing.assert_array_equal(np.nonzero(truncated[:, i])[0], [199, 399])
    np.testing.assert_array_equal(np.asarray(out.episode_length)[[199, 399]], 200)


def test_termination_on_the_last_allowed_step_is_not_truncation():
    env, push, key = envs.make("CartPole-v1"), jnp.ones((40, 1), jnp.int32), jax.random.key(0)
    _, free, _ = _rollout(VecEnv(env, 1), push)(key)
    steps = int(np.asarray(free.terminated)[:, 0].argmax()) + 1
    _, capped, _ = _rollout(VecEnv(env, 1, max_episode_steps=steps), push)(key)
    assert capped.terminated[steps - 1, 0] and not capped.truncated[steps - 1, 0]
    _, shorter, _ = _rollout(VecEnv(env, 1, max_episode_steps=steps - 1), push)(key)
    assert shorter.truncated[steps - 2, 0] and not shorter.terminated[steps - 2, 0]


def test_episode_statistics_match_a_manual_loop():
    vec = VecEnv(envs.make("MountainCarContinuous-v0"), 2, max_episode_steps=25)
    actions = jax.random.uniform(jax.random.key(1), (80, 2, 1), minval=-1.5, maxval=1.5)
    _, out, last = _rollout(vec, actions)(jax.random.key(0))
    reward, done = np.asarray(out.reward), np.asarray(out.terminated | out.truncated)
    np.testing.assert_array_equal(np.nonzero(done[:, 0])[0], [24, 49, 74])
    for i in range(2):
        total, length = 0.0, 0
        for t in range(80):
            total, length = total + float(reward[t, i]), length + 1
            if done[t, i]:
                assert out.episode_return[t, i] == pytest.approx(total, rel=1e-5)
                assert out.episode_length[t, i] == length
                total, length = 0.0, 0
            else:
                assert out.episode_return[t, i] == 0 and out.episode_length[t, i] == 0
        # The running statistics carried in the state are those of the unfinished episode.
        assert last.episode_return[i] == pytest.approx(total, rel=1e-5)
        assert last.episode_length[i] == length == last.time[i]


@pytest.mark.parametrize("env_cls, action", [(CartPoleFunctional, 0), (PendulumFunctional, [0.5])])
def test_accepts_gymnasiums_own_phys2d_func_envs(env_cls, action):
    vec = VecEnv(env_cls(), 3, max_episode_steps=30)
    assert not hasattr(vec.env, "max_episode_steps") and VecEnv(env_cls(), 3).max_episode_steps is None
    actions = jnp.broadcast_to(jnp.asarray(action), (70, 3, *np.shape(action)))
    _, out, _ = _rollout(vec, actions)(jax.random.key(0))
    assert out.obs.dtype == out.final_obs.dtype == out.reward.dtype == jnp.float32
    assert out.obs.shape == (70, 3, *vec.observation_space.shape) and out.reward.shape == (70, 3)
    done = np.asarray(out.terminated | out.truncated)
    assert done.any(axis=0).all()
    if env_cls is PendulumFunctional:
        assert not np.asarray(out.terminated).any()
        np.testing.assert_array_equal(np.nonzero(np.asarray(out.truncated)[:, 0])[0], [29, 59])


def test_same_key_same_bits_and_jit_of_vmap_over_keys():
    vec = VecEnv(envs.make("Acrobot-v1"), 4)
    actions = jax.random.randint(jax.random.key(2), (50, 4), 0, 3)
    run = _rollout(vec, actions)
    a, b, c = (run(jax.random.key(k))[1] for k in (7, 7, 8))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.allclose(a.obs, c.obs)
    # A batch of rollouts under one jit(vmap(...)) gives each key's own rollout.
    keys = jax.random.split(jax.random.key(0), 3)
    batched = jax.jit(jax.vmap(lambda k: run(k)[1]))(keys)
    for j in range(3):
        one = run(keys[j])[1]
        jax.tree.map(lambda x, y, j=j: np.testing.assert_allclose(x[j], y, rtol=1e-5, atol=1e-5), batched, one)


def test_state_and_outputs_have_the_documented_shapes_and_dtypes():
    vec = VecEnv(envs.make("Pendulum-v1"), 5)
    assert vec.num_envs == 5 and vec.params == vec.env.default_params
    assert vec.observation_space == gym.make("Pendulum-v1").observation_space
    state = vec.reset(jax.random.key(0))
    assert state.obs.shape == (5, 3) and state.obs.dtype == jnp.float32
    assert state.time.dtype == state.episode_length.dtype == jnp.int32
    assert state.episode_return.dtype == jnp.float32
    _, out = jax.jit(vec.step)(jax.random.key(1), state, jnp.zeros((5, 1)))
    expected = dict(obs=(5, 3), reward=(5,), terminated=(5,), truncated=(5,), final_obs=(5, 3))
    assert {k: getattr(out, k).shape for k in expected} == expected
    assert out.terminated.dtype == out.truncated.dtype == jnp.bool_
    assert out.episode_return.dtype == jnp.float32 and out.episode_length.dtype == jnp.int32


def test_make_knows_the_ids_and_lists_them_for_an_unknown_one():
    assert envs.ENV_IDS == (
        "Acrobot-v1",
        "Addition-v0",
        "CartPole-v1",
        "CartPoleNoVel-v1",
        "MountainCar-v0",
        "MountainCarContinuous-v0",
        "Pendulum-v1",
        "Sort-v0",
    )
    assert envs.TASK_IDS == ("Addition-v0", "Sort-v0")
    assert all(envs.make(env_id).id == env_id for env_id in envs.ENV_IDS)
    assert envs.make("CartPole-v1") is not envs.make("CartPole-v1")
    with pytest.raises(ConfigError) as excinfo:
        envs.make("Foo-v0")
    assert str(excinfo.value).startswith(
        "unknown env 'Foo-v0': not a kl_rl JAX port (Acrobot-v1, Addition-v0, CartPole-v1, CartPoleNoVel-v1, "
        "MountainCar-v0, MountainCarContinuous-v0, Pendulum-v1, Sort-v0) and gymnasium cannot make it ("
    )
    assert "\n" not in str(excinfo.value)
