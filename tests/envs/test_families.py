"""The JAX-native env families (`kl_rl.envs.families`): gymnax and Brax's pipelines as StepEnvs.

`VecEnv` over a family's adapter must give what the family's own API gives from the same keys
and actions: gymnax's autoresetting `step` (vmapped), and Brax's raw `reset`/`step` with a fresh
reset where an episode ended. Exact equality throughout, but for two gymnax envs whose floats XLA
rounds differently in the two compiled programs (see `FLOAT_SENSITIVE`; bit-exact without
compilation, `test_gymnax_without_compilation_is_bit_exact_...`). A missing family skips only its
own tests. Parity of every gymnax env is slow-marked but for a representative few; Brax's is
checked on a sample of its envs and pipelines (see `BRAX_CASES`).
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium import spaces

import kl_rl
from kl_rl import envs
from kl_rl.cli import main
from kl_rl.envs import VecEnv, families
from kl_rl.sweep import run_sweep
from cli_checks import assert_one_line_error

HAS_GYMNAX = importlib.util.find_spec("gymnax") is not None
HAS_BRAX = importlib.util.find_spec("brax") is not None
needs_gymnax = pytest.mark.skipif(not HAS_GYMNAX, reason="gymnax extra not installed: pip install 'kl_rl[gymnax]'")
needs_brax = pytest.mark.skipif(not HAS_BRAX, reason="brax extra not installed: pip install 'kl_rl[brax]'")

# The ids are written out so that collecting this file imports neither family (gymnax's import
# alone takes seconds); `test_the_id_lists_are_the_adapters_ids` keeps them equal to the adapters'.
GYMNAX_IDS = (
    "CartPole-v1", "Pendulum-v1", "Acrobot-v1", "MountainCar-v0", "MountainCarContinuous-v0",
    "Asterix-MinAtar", "Breakout-MinAtar", "Freeway-MinAtar", "Seaquest-MinAtar", "SpaceInvaders-MinAtar",
    "Catch-bsuite", "DeepSea-bsuite", "MemoryChain-bsuite", "UmbrellaChain-bsuite", "DiscountingChain-bsuite",
    "SimpleBandit-bsuite", "FourRooms-misc", "MetaMaze-misc", "PointRobot-misc", "BernoulliBandit-misc",
    "GaussianBandit-misc", "Reacher-misc", "Swimmer-misc", "Pong-misc", "FrozenLake-misc",
)  # fmt: skip
GYMNAX_DEFAULT_RUN = ("CartPole-v1", "Pendulum-v1", "Breakout-MinAtar", "Catch-bsuite", "FourRooms-misc")
# Brax's `fast` (no System) and `swimmer` (cannot step on current JAX) are left out by the adapter.
BRAX_IDS = (
    "ant", "halfcheetah", "hopper", "humanoid", "humanoidstandup", "inverted_double_pendulum",
    "inverted_pendulum", "pusher", "reacher", "walker2d",
)  # fmt: skip

FLOAT_SENSITIVE = {"CartPole-v1", "Acrobot-v1"}
"""gymnax envs whose float observations differ in the last bits (up to ~2e-6 over 300 steps)
between the two compiled programs, VecEnv's and the vmapped gymnax `step`, for no semantic
reason: run op by op (`jax.disable_jit`) the two sides are bit-identical, while each compiled
side differs from its own op-by-op run. XLA rewrites float arithmetic where it sees constants and
fuses: it folds CartPole's `masspole * cos(theta)**2 / total_mass` (params are Python floats) into
`cos(theta)**2 * (masspole / total_mass)`, one rounding fewer, and at its default backend
optimization level it contracts a * b + c into fused multiply-adds. The two programs hold the
params differently (gymnax's `step` is a jitted function of them; VecEnv closes over them) and
fuse differently, so their rewrites differ. Their float observations are compared to 1e-5 here,
everything else exactly, and `test_gymnax_without_compilation_is_bit_exact_and_splits_termination_from_truncation`
compares them bit for bit without compilation."""
FLOAT_TOL = dict(rtol=1e-5, atol=1e-5)

N, T, LIMIT = 4, 300, 40


def _slow_unless(ids, default_run):
    return [i if i in default_run else pytest.param(i, marks=pytest.mark.slow) for i in ids]


def _random_actions(space, shape, seed=0):
    """[*shape, ...] actions: uniform over a Discrete (int32) or a Box (float32)."""
    rng = np.random.default_rng(seed)
    if isinstance(space, spaces.Discrete):
        return rng.integers(0, space.n, shape).astype(np.int32)
    return rng.uniform(space.low, space.high, (*shape, *space.shape)).astype(np.float32)


def _vec_rollout_fn(vec):
    """VecEnv's side, unjitted: `vec.reset` with one half of a key, then `vec.step` through
    `actions` [T, N, ...] with keys split from the other half, in one scan.

    Returns:
      A function of (key, actions) giving the reset observations [N, ...] and the StepOuts
      stacked over time.
    """

    def rollout(key, actions):
        reset_key, step_key = jax.random.split(key)
        state = vec.reset(reset_key)

        def step(state, xs):
            key, action = xs
            return vec.step(key, state, action)

        _, outs = jax.lax.scan(step, state, (jax.random.split(step_key, len(actions)), actions))
        return state.obs, outs

    return rollout


def _vec_rollout(vec, key, actions):
    """`_vec_rollout_fn` in one jitted program."""
    return jax.jit(_vec_rollout_fn(vec))(key, actions)


def _gymnax_rollout(env, params, key, actions):
    """gymnax's side, from the same keys: vmapped `env.reset` with keys split(reset key, N), then
    vmapped `env.step` (gymnax's own autoreset and time limit) with keys split(step key, N).

    Returns:
      The reset observations and, stacked over time, (obs, reward, terminated, truncated,
      info["final_observation"]), observations flattened to [N, -1] float32.
    """
    num = actions.shape[1]

    def flat(obs):
        return jnp.asarray(obs, jnp.float32).reshape(num, -1)

    def rollout(key, actions):
        reset_key, step_key = jax.random.split(key)
        obs, state = jax.vmap(lambda k: env.reset(k, params))(jax.random.split(reset_key, num))

        def step(state, xs):
            key, action = xs
            keys = jax.random.split(key, num)
            obs, state, reward, terminated, truncated, info = jax.vmap(lambda k, s, a: env.step(k, s, a, params))(
                keys, state, action
            )
            out = (flat(obs), reward, terminated, truncated, flat(info["final_observation"]))
            return state, out

        _, outs = jax.lax.scan(step, state, (jax.random.split(step_key, len(actions)), actions))
        return flat(obs), outs

    return jax.jit(rollout)(key, actions)


def _assert_gymnax_parity(reset_obs, outs, ref_reset_obs, ref, exact=True):
    obs, reward, terminated, truncated, final_obs = (np.asarray(x) for x in ref)

    def assert_floats(actual, expected):
        if exact:
            np.testing.assert_array_equal(actual, expected)
        else:  # see FLOAT_SENSITIVE
            np.testing.assert_allclose(actual, expected, **FLOAT_TOL)

    np.testing.assert_array_equal(reset_obs, ref_reset_obs)
    np.testing.assert_array_equal(outs.reward, reward.astype(np.float32))
    np.testing.assert_array_equal(outs.terminated, terminated)
    np.testing.assert_array_equal(outs.terminated | outs.truncated, terminated | truncated)
    np.testing.assert_array_equal(outs.truncated, truncated & ~terminated)
    assert_floats(outs.obs, obs)
    assert_floats(outs.final_obs, final_obs)


# -- ids ---------------------------------------------------------------------------------------


def test_the_id_lists_are_the_adapters_ids():
    if HAS_GYMNAX:
        assert families._gymnax_ids() == GYMNAX_IDS
    if HAS_BRAX:
        assert families._brax_ids() == BRAX_IDS


# -- gymnax ------------------------------------------------------------------------------------


@needs_gymnax
@pytest.mark.parametrize("name", _slow_unless(GYMNAX_IDS, GYMNAX_DEFAULT_RUN))
def test_gymnax_matches_gymnax_own_autoresetting_step(name):
    vec = VecEnv(envs.make(f"gymnax/{name}"), N).with_params({"max_steps_in_episode": LIMIT})
    assert vec.params.max_steps_in_episode == LIMIT
    actions = _random_actions(vec.action_space, (T, N))
    key = jax.random.key(1)
    reset_obs, outs = _vec_rollout(vec, key, actions)
    ref_reset_obs, ref = _gymnax_rollout(vec.env.family_env, vec.params, key, actions)
    # Every episode ends by the time limit or sooner: each env starts over at least T // LIMIT times.
    assert np.asarray(outs.terminated | outs.truncated).sum(0).min() >= T // LIMIT
    _assert_gymnax_parity(reset_obs, outs, ref_reset_obs, ref, exact=name not in FLOAT_SENSITIVE)


@needs_gymnax
@pytest.mark.parametrize("name", ["CartPole-v1", pytest.param("Acrobot-v1", marks=pytest.mark.slow)])
def test_gymnax_without_compilation_is_bit_exact_and_splits_termination_from_truncation(name):
    # A time limit of 10 steps; envs 0-3 always push one way and end a few steps before it or
    # at it (terminated: the tie goes to termination); envs 4-7 alternate and reach it (truncated).
    vec = VecEnv(envs.make(f"gymnax/{name}"), 8).with_params({"max_steps_in_episode": 10})
    steps = 21
    actions = np.zeros((steps, 8), np.int32)
    actions[:, :4] = 1
    actions[:, 4:] = np.arange(steps)[:, None] % 2
    key = jax.random.key(2)
    with jax.disable_jit():  # op by op: no fusion, so no float differences between the two sides
        reset_obs, outs = _vec_rollout(vec, key, actions)
        ref_reset_obs, ref = _gymnax_rollout(vec.env.family_env, vec.params, key, actions)
    _assert_gymnax_parity(reset_obs, outs, ref_reset_obs, ref, exact=True)
    terminated, truncated = np.asarray(outs.terminated), np.asarray(outs.truncated)
    assert truncated.any()
    assert not (terminated & truncated).any()
    if name == "CartPole-v1":
        assert terminated.any()
        assert (np.asarray(ref[2]) & np.asarray(ref[3])).any()  # both at once in gymnax's terms
    # At a truncation, final_obs is the true next observation (gymnax's final_observation), not
    # the next episode's first one (what `obs` holds).
    t, i = np.nonzero(truncated)
    np.testing.assert_array_equal(np.asarray(outs.final_obs)[t, i], np.asarray(ref[4])[t, i])
    assert (np.asarray(outs.final_obs)[t, i] != np.asarray(outs.obs)[t, i]).any(axis=-1).all()


@needs_gymnax
def test_gymnax_env_params_change_the_dynamics_and_can_be_traced():
    vec = VecEnv(envs.make("gymnax/CartPole-v1"), N)
    assert vec.with_params({}) is vec
    steps = 30
    actions = _random_actions(vec.action_space, (steps, N))
    key = jax.random.key(3)
    default_reset, default = _vec_rollout(vec, key, actions)
    heavy = vec.with_params({"gravity": 30.0})
    assert float(heavy.params.gravity) == 30.0 and vec.params.gravity == pytest.approx(9.8)
    concrete_reset, concrete = _vec_rollout(heavy, key, actions)
    # Same keys: the same first states; then gravity changes the pole's acceleration.
    np.testing.assert_array_equal(default_reset, concrete_reset)
    assert not np.allclose(default.final_obs[0], concrete.final_obs[0])

    # The override as a traced value: vmap over two gravities inside one jitted program.
    def rollout(gravity):
        return _vec_rollout_fn(vec.with_params({"gravity": gravity}))(key, actions)[1]

    traced = jax.jit(jax.vmap(rollout))(jnp.array([9.8, 30.0]))
    for row, expected in enumerate((default, concrete)):
        got = jax.tree.map(lambda x, row=row: np.asarray(x)[row], traced)
        np.testing.assert_array_equal(got.terminated, expected.terminated)
        np.testing.assert_array_equal(got.truncated, expected.truncated)
        # Another compiled program (gravity traced, not a constant): see FLOAT_SENSITIVE.
        np.testing.assert_allclose(got.final_obs, expected.final_obs, **FLOAT_TOL)
    assert np.asarray(traced.terminated).any()


# -- Brax --------------------------------------------------------------------------------------

BRAX_T, BRAX_LIMIT = 300, 100


def _brax_rollout(env, num, limit, key, actions):
    """Brax's side with its raw API, from the same keys as VecEnv: `env.reset` with keys
    split(reset key, N); per step keys split(step key, N), each split into a step key (unused:
    Brax's step is deterministic) and a reset key; `env.step`; a fresh reset with the reset key
    where the env is done or its episode reached `limit` steps.

    Returns:
      The reset observations and, stacked over time, (obs, reward, terminated, truncated, final obs).
    """

    def rollout(key, actions):
        reset_key, step_key = jax.random.split(key)
        state = jax.vmap(env.reset)(jax.random.split(reset_key, num))

        def step(carry, xs):
            state, time = carry
            key, action = xs
            reset_keys = jax.vmap(jax.random.split)(jax.random.split(key, num))[:, 1]
            nxt = jax.vmap(env.step)(state, action)
            fresh = jax.vmap(env.reset)(reset_keys)
            time = time + 1
            terminated = nxt.done > 0
            truncated = (time >= limit) & ~terminated
            done = terminated | truncated

            def where(a, b):
                return jnp.where(done.reshape(done.shape + (1,) * (jnp.ndim(b) - 1)), a, b)

            state = jax.tree.map(where, fresh, nxt)
            out = (state.obs, nxt.reward, terminated, truncated, nxt.obs)
            return (state, jnp.where(done, 0, time)), out

        carry = (state, jnp.zeros(num, jnp.int32))
        _, outs = jax.lax.scan(step, carry, (jax.random.split(step_key, len(actions)), actions))
        return state.obs, outs

    return jax.jit(rollout)(key, actions)


def _brax_case(family, name):
    marks = [] if (family, name) == ("brax", "inverted_pendulum") else [pytest.mark.slow]
    return pytest.param(family, name, marks=marks, id=f"{family}/{name}")


# Parity is checked on a sample of Brax's envs, not all ten: each is a Brax compile of 40-230 s.
# `BraxEnv` is one code path for every env and pipeline (reset; step with `done` as termination,
# the time limit `VecEnv`'s); what differs is the pipeline, whose physics each family runs, and
# whether the env ever ends an episode itself. So: the default run's inverted_pendulum (generalized,
# terminates); reacher (generalized, never terminates: every episode ends at the time limit);
# hopper on each other pipeline (terminates). Generalized hopper is checked against Brax's
# EpisodeWrapper below; `test_the_id_lists_are_the_adapters_ids` checks every id exists.
BRAX_CASES = [_brax_case("brax", name) for name in ("inverted_pendulum", "reacher")] + [
    _brax_case(family, "hopper") for family in ("brax-positional", "brax-spring", "mjx")
]


@needs_brax
@pytest.mark.parametrize("family, name", BRAX_CASES)
def test_brax_matches_brax_raw_api_with_fresh_resets(family, name):
    num = 2
    vec = VecEnv(envs.make(f"{family}/{name}"), num, max_episode_steps=BRAX_LIMIT)
    actions = _random_actions(vec.action_space, (BRAX_T, num))
    key = jax.random.key(4)
    reset_obs, outs = _vec_rollout(vec, key, actions)
    ref_reset_obs, (obs, reward, terminated, truncated, final_obs) = _brax_rollout(
        vec.env.family_env, num, BRAX_LIMIT, key, actions
    )
    assert np.asarray(outs.terminated | outs.truncated).sum(0).min() >= BRAX_T // BRAX_LIMIT
    np.testing.assert_array_equal(reset_obs, ref_reset_obs)
    np.testing.assert_array_equal(outs.obs, obs)
    np.testing.assert_array_equal(outs.reward, reward)
    np.testing.assert_array_equal(outs.terminated, terminated)
    np.testing.assert_array_equal(outs.truncated, truncated)
    np.testing.assert_array_equal(outs.final_obs, final_obs)


@needs_brax
@pytest.mark.slow
def test_brax_termination_and_truncation_match_brax_episode_wrapper():
    from brax.envs.wrappers.training import EpisodeWrapper

    num, limit = 8, 60
    vec = VecEnv(envs.make("brax/hopper"), num, max_episode_steps=limit)
    # Envs 0-3 flail (random actions: the hopper falls, unhealthy, before the limit); envs 4-7
    # act gently and stay healthy until the limit.
    actions = _random_actions(vec.action_space, (limit, num), seed=5)
    actions[:, 4:] *= 0.05
    key = jax.random.key(5)
    _, outs = _vec_rollout(vec, key, actions)
    wrapped = EpisodeWrapper(vec.env.family_env, episode_length=limit, action_repeat=1)

    @jax.jit
    def brax_rollout(key, actions):
        state = jax.vmap(wrapped.reset)(jax.random.split(jax.random.split(key)[0], num))

        def step(state, action):
            state = jax.vmap(wrapped.step)(state, action)
            return state, (state.obs, state.done, state.info["truncation"])

        return jax.lax.scan(step, state, actions)[1]

    obs, done, truncation = (np.asarray(x) for x in brax_rollout(key, actions))
    terminated, truncated = np.asarray(outs.terminated), np.asarray(outs.truncated)
    ended = terminated | truncated
    assert ended.any(axis=0).all()  # every env's first episode ends within the limit
    first_end = ended.argmax(axis=0)
    assert terminated[first_end, np.arange(num)].any() and truncated[first_end, np.arange(num)].any()
    assert (first_end[terminated[first_end, np.arange(num)]] < limit - 1).all()
    for i in range(num):  # the first episode of each env: before any reset
        upto = first_end[i] + 1
        np.testing.assert_array_equal(ended[:upto, i], done[:upto, i] > 0)
        np.testing.assert_array_equal(truncated[:upto, i], truncation[:upto, i] > 0)
        np.testing.assert_array_equal(np.asarray(outs.final_obs)[:upto, i], obs[:upto, i])


@needs_brax
@pytest.mark.slow  # a Brax compile: about 20 s of CPU, more on a busy machine
def test_brax_system_params_change_the_trajectory_and_can_be_traced():
    num, steps = 2, 30
    vec = VecEnv(envs.make("brax/inverted_pendulum"), num)
    assert "opt.timestep" in vec.env.param_names()
    dt = float(vec.params.opt.timestep)
    actions = _random_actions(vec.action_space, (steps, num))
    key = jax.random.key(6)

    def rollout(timestep):
        return _vec_rollout_fn(vec.with_params({"opt.timestep": timestep}))(key, actions)

    reset_obs, outs = jax.jit(jax.vmap(rollout))(jnp.array([dt, 2 * dt], jnp.float32))
    np.testing.assert_array_equal(reset_obs[0], reset_obs[1])  # the same keys: the same first states
    assert not np.allclose(outs.final_obs[0, :5], outs.final_obs[1, :5])
    assert float(vec.with_params({"opt.timestep": 2 * dt}).params.opt.timestep) == pytest.approx(2 * dt)
    assert float(vec.params.opt.timestep) == dt  # the original untouched


# -- CLI and bad input -------------------------------------------------------------------------


@needs_gymnax
@pytest.mark.parametrize(
    "args, needles",
    [
        (["--env", "gymnax/Nope"], ["gymnax has no env 'Nope'", "CartPole-v1"]),
        (["--env", "gymnax/CartPole-v1", "--env.nope", "3"], ["has no env param 'nope'", "gravity"]),
        (["--env", "gymnax/MNISTBandit-bsuite"], ["not adapted", "downloads MNIST"]),
    ],
)
def test_bad_family_input_is_one_line_exit_2(capsys, tmp_path, args, needles):
    code = main(["train", "--out", str(tmp_path / "run"), "--no-progress", *args])
    assert_one_line_error(capsys, code, *needles)
    assert not (tmp_path / "run").exists()


@needs_brax
@pytest.mark.parametrize(
    "env_id, needle", [("brax/fast", "no physical System"), ("mjx/swimmer", "jnp.clip"), ("brax/nope", "hopper")]
)
def test_brax_envs_left_out_or_unknown_are_one_line_exit_2(capsys, tmp_path, env_id, needle):
    code = main(["train", "--out", str(tmp_path / "run"), "--no-progress", "--env", env_id])
    assert_one_line_error(capsys, code, needle)


def test_a_missing_extra_names_the_pip_install(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(families.Family, "installed", lambda self: False)
    code = main(["train", "--out", str(tmp_path / "run"), "--env", "gymnax/CartPole-v1"])
    assert_one_line_error(capsys, code, "gymnax/CartPole-v1 needs gymnax", "pip install 'kl_rl[gymnax]'")
    code = main(["train", "--out", str(tmp_path / "run"), "--env", "mjx/hopper"])
    assert_one_line_error(capsys, code, "pip install 'kl_rl[mjx]'")
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("gymnax:") and "not installed: pip install 'kl_rl[gymnax]'" in line for line in lines)


def test_list_shows_the_installed_families(capsys):
    assert main(["list"]) == 0
    lines = {line.split(":")[0]: line for line in capsys.readouterr().out.splitlines()}
    if HAS_GYMNAX:
        assert "gymnax/CartPole-v1" in lines["gymnax"] and "gymnax/Breakout-MinAtar" in lines["gymnax"]
        assert "MNISTBandit" not in lines["gymnax"]
    if HAS_BRAX:
        for family in ("brax", "brax-positional", "brax-spring", "mjx"):
            assert f"{family}/hopper" in lines[family]


# -- training ----------------------------------------------------------------------------------


@needs_gymnax
def test_ppo_trains_on_a_gymnax_env_and_its_folder_evaluates_under_other_params(tmp_path):
    result = kl_rl.run("ppo", "gymnax/CartPole-v1", seeds=1, total_steps=2048, num_envs=4, num_steps=128)
    assert result.env_path == "jax"
    assert np.isfinite(result.final_returns).all()
    assert all(np.isfinite(v).all() for v in result.metrics.values() if v.dtype.kind == "f")
    # kl-rl eval's path: the saved policy, re-evaluated, gives training's returns exactly; a
    # time limit of 20 steps (gymnax's max_steps_in_episode, a param) caps CartPole's return at 20.
    loaded = kl_rl.load(result.save(tmp_path / "run"))
    np.testing.assert_array_equal(loaded.evaluate(), result.eval_returns)
    short = loaded.evaluate(episodes=3, env_params={"max_steps_in_episode": 20})
    assert short.shape == (1, 3) and np.all(short <= 20) and np.all(short > 0)
    assert result.eval_returns.max() > 20


@needs_gymnax
def test_a_sweep_over_an_env_param_is_one_compiled_program():
    overrides = dict(total_steps=1024, num_envs=4, num_steps=128)
    result = run_sweep("ppo", "gymnax/CartPole-v1", {"env.gravity": [9.8, 30.0]}, seeds=1, overrides=overrides)
    assert len(result.programs) == 1 and result.programs[0]["points"] == [0, 1]
    assert np.isfinite(result.final_returns).all()
    assert result.final_returns[0, 0] != result.final_returns[1, 0]


# -- memory ------------------------------------------------------------------------------------


@needs_gymnax
def test_memorychain_observations_lie_in_the_adapters_space():
    # gymnax declares Box(0, 2) but shows the context bit as -1 or +1: the adapter's Box must
    # hold what the env gives (GYMNAX_UNBOUNDED), the -1s included.
    vec = VecEnv(envs.make("gymnax/MemoryChain-bsuite"), 8)
    actions = _random_actions(vec.action_space, (12, 8))
    reset_obs, outs = _vec_rollout(vec, jax.random.key(0), actions)
    obs = np.concatenate([np.asarray(reset_obs), np.asarray(outs.obs).reshape(-1, 3)])
    assert (obs[:, 2] == -1).any() and (obs[:, 2] == 1).any()
    space = vec.observation_space
    assert all(space.contains(o) for o in obs)


@needs_gymnax
@pytest.mark.slow  # the default tier keeps MemoryChain's space check and tests/test_recurrent.py's recurrent run
def test_a_recurrent_ppo_run_on_memorychain_completes_with_finite_metrics():
    # A tiny GRU run through the adapter at a traced memory length of 3 (episodes of 4 steps,
    # one reward of +1 or -1 at the last): every evaluation episode ends with exactly that reward.
    result = kl_rl.run("ppo", "gymnax/MemoryChain-bsuite", seeds=1, total_steps=256, num_envs=4, num_steps=32,
                       num_minibatches=2, update_epochs=1, network="gru", eval_episodes=4,
                       env_params={"memory_length": 3})  # fmt: skip
    assert all(np.isfinite(v).all() for v in result.metrics.values() if v.dtype.kind == "f")
    assert result.metrics["kl"].shape[-1] == 2
    assert set(np.asarray(result.eval_returns).ravel()) <= {-1.0, 1.0}
