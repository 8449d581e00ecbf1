"""Step-by-step parity of the JAX ports with gymnasium's NumPy originals.

Each parity test samples N states (typical ones and ones near the termination boundaries), sets
the NumPy env's `unwrapped.state`, steps both from it with the same action, and compares next
state, observation, reward and termination to 1e-5. The JAX side is one vmapped, jitted call.
"""

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kl_rl import envs

N = 1200
TOL = dict(atol=1e-5, rtol=1e-5)


def _mix(rng, typical, boundary, frac_boundary=0.4):
    """N rows from the `typical` and `boundary` samplers, shuffled together, as float32."""
    nb = int(N * frac_boundary)
    rows = np.concatenate([typical(rng, N - nb), boundary(rng, nb)]).astype(np.float32)
    return rows[rng.permutation(N)]


def _signs(rng, n):
    return rng.choice([-1.0, 1.0], n)


def _cartpole_states(rng):
    def typical(rng, n):
        return rng.uniform([-2.4, -3, -0.21, -3], [2.4, 3, 0.21, 3], (n, 4))

    def boundary(rng, n):
        # Half the rows with |x| near 2.4, half with |theta| near 12 degrees (0.2094).
        s, half = typical(rng, n), n // 2
        s[:half, 0] = _signs(rng, half) * rng.uniform(2.36, 2.44, half)
        s[half:, 2] = _signs(rng, n - half) * rng.uniform(0.2, 0.22, n - half)
        return s

    return _mix(rng, typical, boundary)


def _acrobot_states(rng, vel_frac=0.5):
    """Acrobot states with velocities up to `vel_frac` of their bounds (4 pi, 9 pi).

    At the top speeds one RK4 step of dt = 0.2 is far outside RK4's stable range (dt times the
    Jacobian's norm is about 10) and amplifies float32 rounding a hundredfold: 2 of 1200
    full-range samples miss gymnasium's float64 by up to 5e-4. The float32 test covers half the
    velocity range; `test_acrobot_full_range_in_float64` covers all of it.
    """

    def typical(rng, n):
        high = np.array([np.pi, np.pi, 4 * np.pi * vel_frac, 9 * np.pi * vel_frac])
        return rng.uniform(-high, high, (n, 4))

    def boundary(rng, n):
        # The tip's height -cos(t1) - cos(t1 + t2) within 0.05 of the threshold 1, moving slowly.
        t1 = _signs(rng, n) * rng.uniform(np.pi / 2 + 0.1, np.pi, n)
        target = np.clip(-1.0 - np.cos(t1) + rng.uniform(-0.05, 0.05, n), -1, 1)
        t2 = np.arccos(target) * _signs(rng, n) - t1
        t2 = (t2 + np.pi) % (2 * np.pi) - np.pi
        return np.stack([t1, t2, rng.uniform(-0.3, 0.3, n), rng.uniform(-0.3, 0.3, n)], axis=1)

    return _mix(rng, typical, boundary)


def _mountain_car_states(goal):
    def typical(rng, n):
        return rng.uniform([-1.2, -0.07], [0.6, 0.07], (n, 2))

    def boundary(rng, n):
        half = n // 2
        near_goal = np.stack([rng.uniform(goal - 0.08, goal + 0.02, half), rng.uniform(-0.01, 0.07, half)], 1)
        near_wall = np.stack([rng.uniform(-1.2, -1.1, n - half), rng.uniform(-0.07, 0.0, n - half)], 1)
        return np.concatenate([near_goal, near_wall])

    return lambda rng: _mix(rng, typical, boundary)


def _pendulum_states(rng):
    def typical(rng, n):
        return rng.uniform([-2 * np.pi, -8], [2 * np.pi, 8], (n, 2))

    def boundary(rng, n):
        # Half the rows with theta near +/-pi (where angle_normalize jumps), half with |thetadot| near 8.
        s, half = typical(rng, n), n // 2
        s[:half, 0] = _signs(rng, half) * rng.uniform(np.pi - 0.05, np.pi + 0.05, half)
        s[half:, 1] = _signs(rng, n - half) * rng.uniform(7.5, 8.0, n - half)
        return s

    return _mix(rng, typical, boundary)


def _discrete(n):
    return lambda rng: rng.integers(0, n, N)


def _box(low, high):
    return lambda rng: rng.uniform(low, high, (N, 1)).astype(np.float32)


# Continuous actions reach beyond the action bounds to check the clipping (and, for
# MountainCarContinuous, the unclipped action in the reward).
CASES = {
    "Acrobot-v1": (_acrobot_states, _discrete(3)),
    "CartPole-v1": (_cartpole_states, _discrete(2)),
    "MountainCar-v0": (_mountain_car_states(0.5), _discrete(3)),
    "MountainCarContinuous-v0": (_mountain_car_states(0.45), _box(-1.5, 1.5)),
    "Pendulum-v1": (_pendulum_states, _box(-3.0, 3.0)),
}


def _at(x, value):
    return np.isclose(x, value, rtol=0, atol=1e-6)


# What the sampled transitions must exercise, judged on gymnasium's results.
COVERAGE = {
    "Acrobot-v1": lambda s, a, e: 0.05 < e["terminated"].mean() < 0.95,
    "CartPole-v1": lambda s, a, e: 0.05 < e["terminated"].mean() < 0.95,
    "MountainCar-v0": lambda s, a, e: (
        0.05 < e["terminated"].mean() < 0.95
        and np.any(_at(e["state"][:, 0], -1.2) & (e["state"][:, 1] == 0))  # left-wall velocity reset
        and np.any(_at(np.abs(e["state"][:, 1]), 0.07))  # velocity clip
    ),
    "MountainCarContinuous-v0": lambda s, a, e: (
        0.05 < e["terminated"].mean() < 0.95
        and np.any(_at(e["state"][:, 0], -1.2) & (e["state"][:, 1] == 0))
        and np.any(e["terminated"] & (np.abs(a[:, 0]) > 1))  # +100 less the unclipped a^2
    ),
    "Pendulum-v1": lambda s, a, e: (
        not e["terminated"].any()
        and np.any(_at(np.abs(e["state"][:, 1]), 8.0))  # speed clip
        and np.any(np.abs(a[:, 0]) > 2)  # torque clip
    ),
}


def _numpy_steps(env_id, states, actions):
    """gymnasium's step from each of `states`, as arrays stacked over the samples."""
    env = gym.make(env_id).unwrapped
    env.reset(seed=0)
    out = {"state": [], "obs": [], "reward": [], "terminated": []}
    for state, action in zip(states, actions, strict=True):
        env.state = np.array(state, dtype=np.float64)
        if hasattr(env, "steps_beyond_terminated"):
            env.steps_beyond_terminated = None  # CartPole: every step is a first step
        obs, reward, terminated, truncated, _ = env.step(action if np.ndim(action) else int(action))
        assert not truncated
        out["state"].append(np.asarray(env.state, np.float64))
        out["obs"].append(obs)
        out["reward"].append(reward)
        out["terminated"].append(terminated)
    return {k: np.asarray(v) for k, v in out.items()}


def _jax_steps(env_id, states, actions):
    """The port's step from each of `states`, vmapped over the samples."""
    env = envs.make(env_id)

    def one(state, action):
        next_state = env.transition(state, action, None, None)
        return {
            "state": next_state,
            "obs": env.observation(next_state, None, None),
            "reward": env.reward(state, action, next_state, None, None),
            "terminated": env.terminal(next_state, None, None),
        }

    return jax.tree.map(np.asarray, jax.jit(jax.vmap(one))(jnp.asarray(states), jnp.asarray(actions)))


def _assert_parity(got, expected):
    np.testing.assert_allclose(got["state"], expected["state"], **TOL)
    np.testing.assert_allclose(got["obs"], expected["obs"], **TOL)
    np.testing.assert_allclose(got["reward"], expected["reward"], **TOL)
    np.testing.assert_array_equal(got["terminated"], expected["terminated"])


@pytest.mark.parametrize("env_id", sorted(CASES))
def test_transitions_match_gymnasium(env_id):
    rng = np.random.default_rng(sorted(CASES).index(env_id))
    sample_states, sample_actions = CASES[env_id]
    states, actions = sample_states(rng), sample_actions(rng)
    expected = _numpy_steps(env_id, states, actions)
    got = _jax_steps(env_id, states, actions)
    assert COVERAGE[env_id](states, actions, expected)
    assert got["state"].dtype == got["obs"].dtype == got["reward"].dtype == np.float32
    assert got["terminated"].dtype == bool
    _assert_parity(got, expected)


def test_acrobot_full_range_in_float64():
    rng = np.random.default_rng(1)
    states = _acrobot_states(rng, vel_frac=1.0).astype(np.float64)
    actions = _discrete(3)(rng)
    expected = _numpy_steps("Acrobot-v1", states, actions)
    with jax.enable_x64(True):  # a context manager since JAX 0.8
        got = _jax_steps("Acrobot-v1", states, actions)
    assert got["state"].dtype == np.float64
    assert np.abs(states[:, 3]).max() > 0.95 * 9 * np.pi  # the samples reach the top speeds
    assert np.any(np.abs(expected["state"][:, 2]) == 4 * np.pi)  # and the velocity clip
    _assert_parity(got, expected)


INITIAL_BOUNDS = {
    "Acrobot-v1": ([-0.1] * 4, [0.1] * 4),
    "CartPole-v1": ([-0.05] * 4, [0.05] * 4),
    "MountainCar-v0": ([-0.6, 0.0], [-0.4, 0.0]),
    "MountainCarContinuous-v0": ([-0.6, 0.0], [-0.4, 0.0]),
    "Pendulum-v1": ([-np.pi, -1.0], [np.pi, 1.0]),
}


@pytest.mark.parametrize("env_id", sorted(CASES))
def test_initial_states_fill_gymnasiums_bounds(env_id):
    env = envs.make(env_id)
    states = np.asarray(jax.jit(jax.vmap(env.initial))(jax.random.split(jax.random.key(0), 4000)))
    low, high = map(np.asarray, INITIAL_BOUNDS[env_id])
    assert states.dtype == np.float32
    assert np.all(states >= low - 1e-6) and np.all(states <= high + 1e-6)
    # Uniform in each range: the extremes come within 1% of the bounds, the mean near the middle.
    spread = high - low
    varies = spread > 0
    np.testing.assert_allclose(states.min(0)[varies], low[varies], atol=0.01 * spread.max())
    np.testing.assert_allclose(states.max(0)[varies], high[varies], atol=0.01 * spread.max())
    np.testing.assert_allclose(states.mean(0), (low + high) / 2, atol=0.03 * spread.max())
    ref = gym.make(env_id)
    ref.reset(seed=0)
    assert np.asarray(ref.unwrapped.state).shape == states.shape[1:]


@pytest.mark.parametrize("env_id", sorted(CASES))
def test_spaces_and_time_limit_match_gymnasium(env_id):
    env, ref = envs.make(env_id), gym.make(env_id)
    assert env.id == env_id
    assert env.observation_space == ref.observation_space
    assert env.action_space == ref.action_space
    assert env.max_episode_steps == ref.spec.max_episode_steps
    obs = env.observation(env.initial(jax.random.key(0)))
    assert obs.shape == env.observation_space.shape and obs.dtype == jnp.float32
    # make() builds a new env each time: no space (and its sampling RNG) is shared.
    assert envs.make(env_id).observation_space is not env.observation_space


def test_params_default_to_gymnasiums_constants_and_can_be_traced():
    env = envs.make("CartPole-v1")
    state, action = jnp.array([0.1, 0.2, 0.05, -0.3]), 1
    assert env.default_params == env.get_default_params()
    np.testing.assert_array_equal(
        env.transition(state, action, None, None), env.transition(state, action, None, env.default_params)
    )
    # A sweep over gravity under vmap: params are pytree leaves, and they matter.
    gravity = jnp.array([0.0, 9.8, 20.0])
    theta_dot = jax.vmap(lambda g: env.transition(state, action, None, env.get_default_params(gravity=g))[3])(gravity)
    np.testing.assert_allclose(theta_dot[1], env.transition(state, action)[3])
    assert theta_dot[0] < theta_dot[1] < theta_dot[2]
