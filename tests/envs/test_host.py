"""The host-side path: gymnasium envs stepped through callbacks from the same compiled program.

The central check trains every algorithm on both paths from one seed and compares the results:
the env is a kl_rl JAX port whose initial state is fixed (so the two paths' different reset
generators draw the same states), run on the JAX path directly and on the host path through
gymnasium's `FunctionalJaxEnv` in a `SyncVectorEnv`. Equal results mean the two paths share the
collector's semantics: autoreset, termination vs truncation bootstrapping, observation and reward
normalization, the buffer and the episode statistics.
"""

import json
import shutil
import subprocess
import sys

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium.envs.functional_jax_env import FunctionalJaxEnv

import kl_rl
from kl_rl import envs, normalize, rollout
from kl_rl.agents import ALGOS
from kl_rl.cli import main
from kl_rl.errors import ConfigError
from kl_rl.train import make_trainer

TIME_LIMIT = 15  # short episodes, so the runs below see truncations as well as terminations


class FixedStartCartPole(envs.CartPole):
    id = "FixedStartCartPole-v0"
    max_episode_steps = TIME_LIMIT

    def initial(self, rng, params=None):
        return jnp.asarray([0.01, -0.02, 0.03, 0.01], jnp.float32)


class FixedStartPendulum(envs.Pendulum):
    id = "FixedStartPendulum-v0"
    max_episode_steps = TIME_LIMIT

    def initial(self, rng, params=None):
        return jnp.asarray([2.5, -0.5], jnp.float32)


for _cls in (FixedStartCartPole, FixedStartPendulum):
    gym.register(
        _cls.id,
        entry_point=lambda cls=_cls: FunctionalJaxEnv(cls()),
        max_episode_steps=TIME_LIMIT,
        disable_env_checker=True,
    )

SMALL = {
    "ppo": dict(total_steps=3 * 4 * 32, num_envs=4, num_steps=32, num_minibatches=2, update_epochs=2),
    "vpg": dict(total_steps=3 * 4 * 32, num_envs=4, num_steps=32, vf_minibatches=2, vf_epochs=2),
    "trpo": dict(total_steps=3 * 4 * 32, num_envs=4, num_steps=32, vf_minibatches=2, vf_epochs=2),
    "cem": dict(iterations=3, population_size=6, num_steps=30),
}
NORMALIZE = dict(normalize_obs=True, normalize_reward=True)


@pytest.mark.parametrize(
    "algo, cls",
    [
        pytest.param("ppo", FixedStartCartPole, marks=pytest.mark.slow),
        pytest.param("vpg", FixedStartCartPole, marks=pytest.mark.slow),
        pytest.param("trpo", FixedStartPendulum, marks=pytest.mark.slow),
        ("cem", FixedStartCartPole),
    ],
)
def test_both_paths_train_alike(algo, cls):
    overrides = {**SMALL[algo], **(NORMALIZE if algo != "cem" else {}), "eval_episodes": 2}
    config = ALGOS[algo].config(**overrides)
    keys = jax.random.split(jax.random.key(3), 2)
    outs = {}
    for path, env in (("jax", cls()), ("host", envs.GymEnv(cls.id))):
        trainer = make_trainer(algo, config, env)
        assert trainer.env_path == path
        outs[path] = jax.device_get(jax.jit(jax.vmap(trainer.train))(keys))
    jax_out, host_out = outs["jax"], outs["host"]
    assert jax_out.metrics.keys() == host_out.metrics.keys()
    for name in jax_out.metrics:
        np.testing.assert_allclose(host_out.metrics[name], jax_out.metrics[name], rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(host_out.eval_returns, jax_out.eval_returns, rtol=1e-4, atol=1e-4)
    leaves = jax.tree.leaves_with_path(jax_out.state.agent)
    for (where, a), b in zip(leaves, jax.tree.leaves(host_out.state.agent), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(where))
    if algo != "cem":
        collector_j, collector_h = jax_out.state.collector, host_out.state.collector
        for a, b in zip(
            jax.tree.leaves((collector_j.obs_norm, collector_j.reward_norm)),
            jax.tree.leaves((collector_h.obs_norm, collector_h.reward_norm)),
            strict=True,
        ):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    # The runs did end episodes both ways: by termination and (CartPole) by the time limit.
    transitions = jax_out.state.buffer.data
    assert bool(np.any(transitions.truncated))
    if cls is FixedStartCartPole:
        assert bool(np.any(transitions.terminated))


def test_scale_reward_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    rewards = rng.normal(1.0, 2.0, size=(50, 3)).astype(np.float32)
    dones = rng.random((50, 3)) < 0.1
    gamma = 0.9
    state = normalize.init(())
    returns = jnp.zeros(3)
    scaled = []
    for r, d in zip(rewards, dones, strict=True):
        state, returns, s = rollout.scale_reward(state, returns, jnp.asarray(r), jnp.asarray(d), gamma)
        scaled.append(np.asarray(s))
    # Reference: every discounted return seen so far, restarted after each episode's end.
    seen, ret, expected = [], np.zeros(3), []
    for r, d in zip(rewards, dones, strict=True):
        ret = ret * gamma + r
        seen.extend(ret)
        expected.append(np.clip(r / np.sqrt(np.var(seen) + 1e-8), -10, 10))
        ret = np.where(d, 0.0, ret)
    np.testing.assert_allclose(np.array(scaled), np.array(expected), rtol=2e-3, atol=1e-5)


@pytest.mark.slow
def test_sync_and_async_vectorization_agree():
    kwargs = dict(seeds=2, total_steps=2 * 2 * 16, num_envs=1, num_steps=16, eval_episodes=1, env_path="host")
    sync = kl_rl.run("ppo", "CartPole-v1", vectorization="sync", **kwargs)
    assync = kl_rl.run("ppo", "CartPole-v1", vectorization="async", **kwargs)
    assert sync.env_path == assync.env_path == "host"
    np.testing.assert_allclose(assync.metrics["episode_return"], sync.metrics["episode_return"])
    np.testing.assert_allclose(assync.eval_returns, sync.eval_returns)
    assert 0 < sync.env_time_s < sync.wall_time_s


@pytest.mark.slow  # long; slow-marked to keep the default run under 10 minutes (issue 16)
def test_host_run_resumes_with_its_normalizers(tmp_path):
    """A host run's checkpoint holds both normalizers; resuming continues them (and new episodes)."""
    kwargs = dict(seeds=2, total_steps=3 * 2 * 16, num_envs=2, num_steps=16, eval_episodes=2, **NORMALIZE)
    whole = kl_rl.run("ppo", "CartPole-v1", env_path="host", **kwargs)
    folder = tmp_path / "run"
    first = kl_rl.run("ppo", "CartPole-v1", env_path="host", checkpoint_dir=folder, checkpoint_every=1, **kwargs)
    first.save(folder, checkpoint_every=1)
    loaded = kl_rl.load(folder, update=2)  # the two newest checkpoints are kept
    assert loaded.trainer.env_path == "host"
    np.testing.assert_allclose(loaded.state.collector.obs_norm.count, 1e-4 + 2 * 2 * 16)
    np.testing.assert_allclose(loaded.state.collector.reward_norm.count, 1e-4 + 2 * 2 * 16)
    shutil.rmtree(folder / "checkpoints" / "3")  # back to the checkpoint after update 2
    (folder / "summary.json").unlink()
    resumed = kl_rl.run("ppo", "CartPole-v1", env_path="host", checkpoint_dir=folder, checkpoint_every=1, **kwargs)
    for name in ("obs_norm", "reward_norm"):
        np.testing.assert_allclose(
            getattr(resumed.final_state.collector, name).count, getattr(whole.final_state.collector, name).count
        )
    np.testing.assert_array_equal(resumed.metrics["env_steps"], whole.metrics["env_steps"])


def test_mujoco_run_folder_records_the_host_path(tmp_path, capsys):
    out = tmp_path / "cheetah"
    code = main(
        ["train", "--algo", "ppo", "--env", "HalfCheetah-v5", "--total-steps", "128", "--num-steps", "64",
         "--num-minibatches", "2", "--eval-episodes", "1", "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "host-side gymnasium envs, sync" in printed and "% of wall time" in printed
    config = json.loads((out / "config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert config["env_path"] == summary["env_path"] == "host"
    assert config["normalize_reward"] is True  # the preset
    assert 0 < summary["env_time_s"] < summary["wall_time_s"]
    loaded = kl_rl.load(out)
    action = np.asarray(loaded.act(np.zeros((3, 17), np.float32)))
    assert action.shape == (3, 6) and np.all(np.abs(action) <= 1.0)
    # kl-rl eval's path on the host: training's final returns again, exactly; env params are
    # JAX values, which a gymnasium env has none of.
    np.testing.assert_array_equal(loaded.evaluate().mean(axis=1), np.asarray(summary["final_return"], np.float32))
    with pytest.raises(ConfigError, match="runs on the host path"):
        loaded.evaluate(env_params={"opt.timestep": 0.01})


class DictObsEnv(gym.Env):
    observation_space = gym.spaces.Dict({"x": gym.spaces.Box(-1.0, 1.0, (2,))})
    action_space = gym.spaces.Discrete(2)


gym.register("DictObs-v0", entry_point=DictObsEnv)


@pytest.mark.parametrize(
    "env, message",
    [
        ("NoSuchEnv-v0", "unknown env 'NoSuchEnv-v0': not a kl_rl JAX port"),
        ("DictObs-v0", "DictObs-v0 has Dict observations; kl_rl supports Box"),
        ("Blackjack-v1", "Blackjack-v1 has Tuple observations"),
        ("CliffWalking-v1", "CliffWalking-v1 has Discrete observations"),
    ],
)
def test_bad_envs_are_one_line_errors(env, message, capsys, tmp_path):
    assert main(["train", "--env", env, "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_bad_path_flags_are_one_line_errors(capsys):
    assert main(["train", "--env", "HalfCheetah-v5", "--env-path", "jax"]) == 2
    assert "'HalfCheetah-v5' has no JAX port" in capsys.readouterr().err
    assert main(["train", "--env", "CartPole-v1", "--env-path", "gpu"]) == 2
    assert "unknown --env-path 'gpu'" in capsys.readouterr().err
    assert main(["train", "--env", "HalfCheetah-v5", "--vectorization", "threads"]) == 2
    assert "unknown --vectorization 'threads'" in capsys.readouterr().err


def test_missing_extra_names_it(tmp_path):
    """Without the mujoco package (hidden from the import system), the error names the extra."""
    code = (
        "import sys; sys.modules['mujoco'] = None\n"
        "from kl_rl.cli import main\n"
        f"sys.exit(main(['train', '--env', 'HalfCheetah-v5', '--out', {str(tmp_path / 'x')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'kl_rl[mujoco]'" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # long; slow-marked to keep the default run under 10 minutes (issue 16)
def test_host_sweep_matches_a_separate_run_of_its_second_point():
    """One vector env holds points x seeds x envs copies; each point's copies are its own."""
    from kl_rl import sweep

    base = dict(total_steps=2 * 2 * 16, num_envs=2, num_steps=16, eval_episodes=2)
    grid = {"lr": [3e-4, 1e-2]}
    result = sweep.run_sweep("ppo", "CartPole-v1", grid, seeds=2, overrides=base, env_path="host")
    alone = kl_rl.run("ppo", "CartPole-v1", seeds=2, env_path="host", **base, lr=1e-2)
    np.testing.assert_allclose(result.metrics["kl"][1], alone.metrics["kl"], rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(result.metrics["episode_return"][1], alone.metrics["episode_return"], rtol=1e-5)
    np.testing.assert_allclose(result.final_returns[1], alone.final_returns, rtol=1e-4)
    assert not np.allclose(result.metrics["kl"][0], result.metrics["kl"][1])
