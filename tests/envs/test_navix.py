"""navix envs through `NavixEnv` and `VecEnv`: exact parity with navix's own `_step` and `reset`.

navix's public `step` autoresets lazily (the call after a done step returns the reset timestep
and ignores its action); the adapter turns that off and `VecEnv` resets in the same step, with
the reset key split from each copy's step key. The reference here is written by hand from
navix's `_step` (the transition, no autoreset) and `reset`, with the same keys, so each step's
observation, reward, termination, truncation and true next observation must match exactly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("navix", reason="navix extra not installed: pip install 'kl_rl[navix]'")

import navix

import kl_rl
from kl_rl import envs
from kl_rl.cli import main
from kl_rl.envs.families import NavixEnv, _navix_ids
from kl_rl.envs.vector import VecEnv, param_names

N = 4
T = 300
FAST_IDS = ("Navix-Dynamic-Obstacles-6x6-v0",)
"""Parity in the default run. Empty-5x5 is covered in the default run by the autoreset test below."""
SLOW_IDS = (
    "Navix-Empty-Random-5x5-v0",
    "Navix-DoorKey-Random-5x5-v0",
    "Navix-FourRooms-v0",
    "Navix-KeyCorridorS3R1-v0",
    "Navix-LavaGapS5-v0",
    "Navix-SimpleCrossingS9N1-v0",
    "Navix-Dynamic-Obstacles-5x5-Random-v0",
    "Navix-DistShift1-v0",
    "Navix-GoToDoor-5x5-v0",
)
"""Parity in the slow tier: a sample of navix's 41 ids, not all of them (compiling is most of each
test's time, 10-100 s an id). The adapter (`NavixEnv`) and `VecEnv` are one code path for every
id; what differs is navix's own env class (one module each: its reset, and the events that end an
episode or pay: goal, lava, collision, key and door, the done action, the time limit) and, within a
class, the grid size, which only changes shapes, and `random_start`, a branch of the reset. So the
sample is one id per class, its smallest grid, with the random start where the class has one
(Dynamic-Obstacles' fixed start is the default run's). `test_every_id_is_listed_...` fails on a
class it does not know, so a new class gets a sample."""
CLASSES = ("Empty", "DoorKey", "FourRooms", "KeyCorridor", "LavaGap", "SimpleCrossing", "Dynamic-Obstacles",
           "DistShift", "GoToDoor")  # fmt: skip


def _flat(observation: jax.Array) -> jax.Array:
    return jnp.asarray(observation, jnp.float32).reshape(-1)


def _adapter_rollout(vec, reset_key, step_keys, actions):
    """kl_rl's side: `VecEnv` over the adapter, the whole loop one lax.scan (jitted by the caller)."""
    state = vec.reset(reset_key)

    def body(state, xs):
        key, action = xs
        state, out = vec.step(key, state, action)
        return state, out

    _, outs = jax.lax.scan(body, state, (step_keys, actions))
    return state.obs, outs


def _navix_rollout(env, reset_key, step_keys, actions):
    """The reference: navix's `reset` and `_step`, with VecEnv's key splits written out."""
    timestep = jax.vmap(env.reset)(jax.random.split(reset_key, N))

    def one(key, timestep, action):
        _, reset_key = jax.random.split(key)  # the step key: navix keeps its own key in the state
        nxt = env._step(timestep, action)
        done = nxt.step_type > 0
        following = jax.lax.cond(done, lambda: env.reset(reset_key), lambda: nxt)
        return following, dict(
            obs=_flat(following.observation),
            reward=jnp.asarray(nxt.reward, jnp.float32),
            terminated=nxt.step_type == 2,
            truncated=nxt.step_type == 1,
            final_obs=_flat(nxt.observation),
            t=nxt.t,
            episode_return=nxt.info["return"],
        )

    def body(timestep, xs):
        key, action = xs
        return jax.vmap(one)(jax.random.split(key, N), timestep, action)

    _, outs = jax.lax.scan(body, timestep, (step_keys, actions))
    return jax.vmap(_flat)(timestep.observation), outs


def _ids():
    return [*FAST_IDS, *(pytest.param(i, marks=pytest.mark.slow) for i in SLOW_IDS)]


def _class(name):
    return next(c for c in CLASSES if name.startswith(f"Navix-{c}"))


def test_every_id_is_listed_and_the_sampled_ones_cover_every_class():
    ids = _navix_ids()
    assert len(ids) == len(set(ids)) >= 41
    assert set(FAST_IDS) | set(SLOW_IDS) <= set(ids)
    assert all(any(i.startswith(f"Navix-{c}") for c in CLASSES) for i in ids), "a navix class with no sample"
    assert sorted(map(_class, SLOW_IDS)) == sorted(CLASSES)


@pytest.mark.parametrize("name", _ids())
def test_parity_with_navix_step_and_reset(name):
    env = envs.make(f"navix/{name}")
    assert isinstance(env, NavixEnv)
    assert env.max_episode_steps == navix.make(name).max_steps == 100
    key_reset, key_steps, key_actions = jax.random.split(jax.random.key(0), 3)
    step_keys = jax.random.split(key_steps, T)
    actions = jax.random.randint(key_actions, (T, N), 0, env.action_space.n, jnp.int32)

    # Both envs are made outside jit: navix builds its spaces with jnp, concrete only outside a trace.
    vec, navix_env = VecEnv(env, N), navix.make(name)
    obs0, got = jax.jit(functools.partial(_adapter_rollout, vec))(key_reset, step_keys, actions)
    ref_obs0, ref = jax.jit(functools.partial(_navix_rollout, navix_env))(key_reset, step_keys, actions)
    got, ref = jax.device_get((got, ref))

    np.testing.assert_array_equal(np.asarray(obs0), np.asarray(ref_obs0), err_msg="reset obs")
    for field in ("obs", "reward", "terminated", "truncated", "final_obs"):
        a, b = np.asarray(getattr(got, field)), np.asarray(ref[field])
        assert a.shape == b.shape, (field, a.shape, b.shape)
        for t in range(T):  # step by step, so a failure names the first step that differs
            np.testing.assert_array_equal(a[t], b[t], err_msg=f"{name}: {field} at step {t}")

    # Episode bookkeeping: at a done step, VecEnv's length and return are navix's t and return.
    done = ref["terminated"] | ref["truncated"]
    np.testing.assert_array_equal(got.episode_length, np.where(done, ref["t"], 0))
    np.testing.assert_allclose(got.episode_return, np.where(done, ref["episode_return"], 0.0), rtol=1e-6, atol=1e-6)
    # 300 steps cross navix's 100-step time limit: resets happened, and their obs were compared.
    assert done.any(), f"{name}: no episode ended in {T} steps"
    assert done.sum(axis=0).min() >= 2, f"{name}: some copy ended fewer than 2 episodes in {T} steps"


def _lazy_vs_same_step(env, vec, key):
    """navix's own `step` against VecEnv's on Navix-Empty-5x5-v0 around a truncation.

    The scripted actions (forward, then rotate) never reach the goal, so the episode is truncated
    at navix's time limit (t = 100) in a state other than the start.
    """
    steps = env.max_steps
    actions = jnp.asarray([2] + [0] * (steps - 1), jnp.int32)  # 2: forward, 0: rotate_ccw

    # navix's public step, lazily autoresetting.
    start = env.reset(jax.random.split(key, 1)[0])  # the key VecEnv(N=1).reset gives copy 0
    done_ts, _ = jax.lax.scan(lambda ts, a: (env.step(ts, a), None), start, actions)
    every_action = jnp.arange(vec.action_space.n, dtype=jnp.int32)
    lazy = jax.vmap(lambda a: env.step(done_ts, a))(every_action)
    true_next = jax.vmap(lambda a: env._step(done_ts, a))(every_action)

    # kl_rl's VecEnv over the adapter, one copy, the same actions, then one forward step.
    step_keys = jax.random.split(jax.random.fold_in(key, 1), steps + 1)
    vec_actions = jnp.concatenate([actions, jnp.asarray([2], jnp.int32)])[:, None]
    _, outs = jax.lax.scan(lambda s, xs: vec.step(xs[0], s, xs[1]), vec.reset(key), (step_keys, vec_actions))
    # The reset VecEnv did at the done step: copy 0's key, split into (step key, reset key).
    reset_key = jax.random.split(jax.random.split(step_keys[steps - 1], 1)[0])[1]
    vec_reset = env.reset(reset_key)
    after_reset = env._step(vec_reset, jnp.asarray(2, jnp.int32))
    return done_ts, lazy, true_next, outs, vec_reset, after_reset


def test_navix_lazy_autoreset_differs_from_the_same_step_reset():
    name = "Navix-Empty-5x5-v0"
    env, vec = navix.make(name), VecEnv(envs.make(f"navix/{name}"), 1)
    results = jax.jit(functools.partial(_lazy_vs_same_step, env, vec))(jax.random.key(3))
    done_ts, lazy, true_next, outs, vec_reset, after_reset = jax.device_get(results)
    steps = int(done_ts.t)
    assert steps == 100 and int(done_ts.step_type) == 1  # truncated at navix's time limit

    # navix's step after a done step: the reset timestep (t == 0), whatever the action.
    np.testing.assert_array_equal(lazy.t, 0)
    np.testing.assert_array_equal(lazy.step_type, 0)
    np.testing.assert_array_equal(lazy.reward, 0.0)
    for a in range(1, len(lazy.t)):
        np.testing.assert_array_equal(lazy.observation[a], lazy.observation[0], err_msg=f"action {a}")
    # `_step` from the same done timestep is a real transition instead (t == 101).
    np.testing.assert_array_equal(true_next.t, steps + 1)

    # VecEnv: the done step already carries the reset obs in `obs`, the true next obs in `final_obs`.
    done = outs.truncated[:, 0] | outs.terminated[:, 0]
    assert done.tolist() == [False] * (steps - 1) + [True, False]
    assert bool(outs.truncated[steps - 1, 0]) and not bool(outs.terminated[steps - 1, 0])
    assert int(outs.episode_length[steps - 1, 0]) == steps
    np.testing.assert_array_equal(outs.final_obs[steps - 1, 0], np.asarray(done_ts.observation, np.float32).ravel())
    np.testing.assert_array_equal(outs.obs[steps - 1, 0], np.asarray(vec_reset.observation, np.float32).ravel())
    assert not np.array_equal(outs.obs[steps - 1, 0], outs.final_obs[steps - 1, 0])  # moved off the start
    # and the step after it is a transition of its own action from the reset state, not a reset.
    np.testing.assert_array_equal(outs.final_obs[steps, 0], np.asarray(after_reset.observation, np.float32).ravel())
    assert not np.array_equal(outs.final_obs[steps, 0], outs.obs[steps - 1, 0])  # forward moved the agent


def test_navix_has_no_env_params():
    env = envs.make("navix/Navix-Empty-5x5-v0")
    assert env.param_names() == () == param_names(env)
    assert env.default_params is None
    with pytest.raises(ValueError, match="no traced params"):
        env.with_params(None, {"foo": 1})
    vec = VecEnv(env, 2)
    assert vec.with_params({}) is vec


def test_cli_env_param_on_navix_is_a_one_line_exit_2(capsys, tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--algo", "ppo", "--env", "navix/Navix-Empty-5x5-v0", "--env.foo", "1", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("kl-rl: error: ")
    assert "navix/Navix-Empty-5x5-v0" in lines[0] and "foo" in lines[0], lines[0]
    assert "Traceback" not in captured.err
    assert not out.exists()


@pytest.mark.slow  # the gymnax end-to-end run covers the family path in the default run
def test_ppo_runs_end_to_end_on_navix():
    result = kl_rl.run("ppo", "navix/Navix-Empty-5x5-v0", seeds=1, total_steps=2048, num_envs=4, num_steps=128)
    assert result.env_path == "jax"
    returns = np.asarray(result.final_returns)
    assert returns.size >= 1 and np.isfinite(returns).all(), returns
