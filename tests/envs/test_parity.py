"""Step-by-step parity of the JAX ports with gymnasium's NumPy originals.

Each test samples states (typical ones and ones near the termination boundaries), sets the NumPy
env's `unwrapped.state`, steps both with the same action, and compares next state, observation,
reward and termination to 1e-5.
"""

import os
import pathlib
import subprocess
import sys

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kl_rl import envs

N = 1200
TOL = dict(atol=1e-5, rtol=1e-5)


def _mix(rng, typical, boundary, frac_boundary=0.4):
    """Rows from `typical` and `boundary` samplers, shuffled together."""
    nb = int(N * frac_boundary)
    rows = np.concatenate([typical(rng, N - nb), boundary(rng, nb)]).astype(np.float32)
    return rows[rng.permutation(N)]


def _cartpole_states(rng):
    def typical(rng, n):
        return rng.uniform([-2.4, -3, -0.21, -3], [2.4, 3, 0.21, 3], (n, 4))

    def boundary(rng, n):
        s = typical(rng, n)
        half = n // 2
        s[:half, 0] = rng.choice([-1, 1], half) * rng.uniform(2.36, 2.44, half)
        s[half:, 2] = rng.choice([-1, 1], n - half) * rng.uniform(0.2, 0.22, n - half)
        return s

    return _mix(rng, typical, boundary)


def _acrobot_states(rng, vel_frac=0.5):
    """Acrobot states with velocities up to `vel_frac` of their bounds (4 pi, 9 pi).

    One RK4 step of dt = 0.2 at the top speeds amplifies rounding about a hundredfold, so float32
    cannot match gymnasium's float64 to 1e-5 there (3 of 1200 full-range samples miss, by up to
    1e-3). The float32 test covers half the velocity range; `test_acrobot_full_range_in_float64`
    covers all of it, showing the port's arithmetic is gymnasium's.
    """

    def typical(rng, n):
        high = np.array([np.pi, np.pi, 4 * np.pi * vel_frac, 9 * np.pi * vel_frac])
        return rng.uniform(-high, high, (n, 4))

    def boundary(rng, n):
        # -cos(t1) - cos(t1 + t2) within 0.05 of the height threshold 1, moving slowly.
        t1 = rng.choice([-1, 1], n) * rng.uniform(np.pi / 2 + 0.1, np.pi, n)
        target = np.clip(-1.0 - np.cos(t1) + rng.uniform(-0.05, 0.05, n), -1, 1)
        t2 = np.arccos(target) * rng.choice([-1, 1], n) - t1
        t2 = (t2 + np.pi) % (2 * np.pi) - np.pi
        return np.stack([t1, t2, rng.uniform(-0.3, 0.3, n), rng.uniform(-0.3, 0.3, n)], axis=1)

    return _mix(rng, typical, boundary)


def _mountain_car_states(goal):
    def sample(rng):
        def typical(rng, n):
            return rng.uniform([-1.2, -0.07], [0.6, 0.07], (n, 2))

        def boundary(rng, n):
            half = n // 2
            near_goal = np.stack([rng.uniform(goal - 0.08, goal + 0.02, half), rng.uniform(-0.01, 0.07, half)], 1)
            near_wall = np.stack([rng.uniform(-1.2, -1.1, n - half), rng.uniform(-0.07, 0.0, n - half)], 1)
            return np.concatenate([near_goal, near_wall])

        return _mix(rng, typical, boundary)

    return sample


def _pendulum_states(rng):
    def typical(rng, n):
        return rng.uniform([-2 * np.pi, -8], [2 * np.pi, 8], (n, 2))

    def boundary(rng, n):
        s = typical(rng, n)
        half = n // 2
        s[:half, 0] = rng.choice([-1, 1], half) * rng.uniform(np.pi - 0.05, np.pi + 0.05, half)
        s[half:, 1] = rng.choice([-1, 1], n - half) * rng.uniform(7.5, 8.0, n - half)
        return s

    return _mix(rng, typical, boundary)


def _discrete(n):
    return lambda rng: rng.integers(0, n, N)


def _box(low, high):
    return lambda rng: rng.uniform(low, high, (N, 1)).astype(np.float32)


CASES = {
    "CartPole-v1": (_cartpole_states, _discrete(2)),
    "Acrobot-v1": (_acrobot_states, _discrete(3)),
    "MountainCar-v0": (_mountain_car_states(0.5), _discrete(3)),
    # Actions beyond the bounds check the clipping (and the unclipped action in the reward).
    "MountainCarContinuous-v0": (_mountain_car_states(0.45), _box(-1.5, 1.5)),
    "Pendulum-v1": (_pendulum_states, _box(-3.0, 3.0)),
}


def _numpy_steps(env_id, states, actions):
    env = gym.make(env_id).unwrapped
    env.reset(seed=0)
    out = {"state": [], "obs": [], "reward": [], "terminated": []}
    for state, action in zip(states, actions, strict=True):
        env.state = np.array(state, dtype=np.float64)
        if hasattr(env, "steps_beyond_terminated"):
            env.steps_beyond_terminated = None
        obs, reward, terminated, truncated, _ = env.step(action if np.ndim(action) else int(action))
        assert not truncated
        out["state"].append(np.asarray(env.state, np.float64))
        out["obs"].append(obs)
        out["reward"].append(reward)
        out["terminated"].append(terminated)
    return {k: np.asarray(v) for k, v in out.items()}


def _jax_steps(env_id, states, actions):
    env = envs.make(env_id)
    params = env.default_params

    def one(state, action):
        next_state = env.transition(state, action, None, params)
        return {
            "state": next_state,
            "obs": env.observation(next_state, None, params),
            "reward": env.reward(state, action, next_state, None, params),
            "terminated": env.terminal(next_state, None, params),
        }

    return jax.tree.map(np.asarray, jax.jit(jax.vmap(one))(jnp.asarray(states), jnp.asarray(actions)))


@pytest.mark.parametrize("env_id", sorted(CASES))
def test_transitions_match_gymnasium(env_id):
    rng = np.random.default_rng(sorted(CASES).index(env_id))
    sample_states, sample_actions = CASES[env_id]
    states, actions = sample_states(rng), sample_actions(rng)
    expected = _numpy_steps(env_id, states, actions)
    got = _jax_steps(env_id, states, actions)
    np.testing.assert_allclose(got["state"], expected["state"], **TOL)
    np.testing.assert_allclose(got["obs"], expected["obs"], **TOL)
    np.testing.assert_allclose(got["reward"], expected["reward"], **TOL)
    np.testing.assert_array_equal(got["terminated"], expected["terminated"])
    # The boundary samples must really exercise termination both ways.
    if env_id != "Pendulum-v1":
        assert 0.05 < expected["terminated"].mean() < 0.95, expected["terminated"].mean()


BOUNDS = {
    "CartPole-v1": ([-0.05] * 4, [0.05] * 4),
    "Acrobot-v1": ([-0.1] * 4, [0.1] * 4),
    "MountainCar-v0": ([-0.6, 0.0], [-0.4, 0.0]),
    "MountainCarContinuous-v0": ([-0.6, 0.0], [-0.4, 0.0]),
    "Pendulum-v1": ([-np.pi, -1.0], [np.pi, 1.0]),
}


@pytest.mark.parametrize("env_id", sorted(CASES))
def test_initial_states_and_spaces_match_gymnasium(env_id):
    env = envs.make(env_id)
    ref = gym.make(env_id)
    assert env.observation_space == ref.observation_space
    assert env.action_space == ref.action_space
    assert env.max_episode_steps == ref.spec.max_episode_steps
    states = np.asarray(jax.vmap(env.initial)(jax.random.split(jax.random.key(0), 4000)))
    low, high = map(np.asarray, BOUNDS[env_id])
    assert np.all(states >= low - 1e-7) and np.all(states <= high + 1e-7)
    spread = high - low
    # Uniform over the range: extremes reach within 1% of each bound.
    np.testing.assert_allclose(states.min(0)[spread > 0], low[spread > 0], atol=0.01 * spread.max())
    np.testing.assert_allclose(states.max(0)[spread > 0], high[spread > 0], atol=0.01 * spread.max())
    ref_state = np.asarray(ref.reset(seed=0)[0])
    assert ref_state.shape == np.asarray(env.observation(states[0], None, None)).shape
    assert np.asarray(ref.unwrapped.state).shape == states[0].shape


def test_acrobot_full_range_in_float64():
    code = (
        "import sys, numpy as np; sys.path.insert(0, 'tests/envs'); import test_parity as t;"
        "rng = np.random.default_rng(1); s = t._acrobot_states(rng, vel_frac=1.0).astype(np.float64);"
        "a = t._discrete(3)(rng); e = t._numpy_steps('Acrobot-v1', s, a); g = t._jax_steps('Acrobot-v1', s, a);"
        "assert g['state'].dtype == np.float64;"
        "np.testing.assert_allclose(g['state'], e['state'], **t.TOL);"
        "np.testing.assert_allclose(g['reward'], e['reward'], **t.TOL);"
        "np.testing.assert_array_equal(g['terminated'], e['terminated']);"
        "print(np.abs(s[:, 3]).max())"
    )
    root = pathlib.Path(__file__).resolve().parents[2]
    pythonpath = f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "JAX_ENABLE_X64": "1", "PYTHONPATH": pythonpath}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=False, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout) > 0.95 * 9 * np.pi  # the sample reached the top speed


def test_unknown_id_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown env 'CartPole-v0'; available: Acrobot-v1, CartPole-v1"):
        envs.make("CartPole-v0")
