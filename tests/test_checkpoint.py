"""Checkpoints: a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from kl_rl import checkpoint, runner
from kl_rl.cli import main

ROOT = Path(__file__).resolve().parents[1]

# Small runs: 8 updates, a checkpoint every 3 (so the last segment is shorter than the others).
RUNS = {
    "ppo": ["--total-steps", "4096", "--num-envs", "4", "--num-steps", "128", "--normalize-obs", "true"],
    "trpo": ["--total-steps", "4096", "--num-envs", "4", "--num-steps", "128", "--vf-minibatches", "4"],
    "cem": ["--iterations", "8", "--population-size", "8"],
}
EVERY = "3"
KILL_AFTER_UPDATE = 7

# Runs the CLI in a child process that SIGKILLs itself from inside the compiled run (through the
# progress callback) once KILL_AFTER_UPDATE updates are done: no cleanup, no flush, mid-segment,
# possibly while an asynchronous checkpoint save is still writing.
KILLER = """
import os, signal, sys
from kl_rl import cli, runner
real_run = runner.run
def run(*args, **kwargs):
    def progress(env_steps):
        if env_steps >= {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)
    kwargs["progress"] = progress
    return real_run(*args, **kwargs)
runner.run = run
sys.exit(cli.main(sys.argv[1:]))
"""


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(checkpoint.to_storable(tree))]


def _steps_per_update(run_dir: Path) -> int:
    algo, env, seeds, config, _ = runner.read_run_config(run_dir)
    from kl_rl import envs
    from kl_rl.train import make_trainer

    return make_trainer(algo, config, envs.make(env)).steps_per_update * len(seeds)


@pytest.mark.parametrize("algo", sorted(RUNS))
def test_sigkill_then_resume_is_bit_identical(tmp_path, capsys, algo):
    args = ["train", "--algo", algo, "--env", "CartPole-v1", "--seeds", "2", "--checkpoint-every", EVERY]
    args += [*RUNS[algo], "--no-progress"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main([*args, "--out", str(whole)]) == 0

    kill_at = _steps_per_update(whole) * KILL_AFTER_UPDATE
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KL_RL_CACHE_DIR": "off"}
    child = subprocess.run(
        [sys.executable, "-c", KILLER.format(kill_at=kill_at), *args[:-1], "--out", str(killed)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -9, child.stderr[-2000:]
    assert not (killed / "summary.json").exists()
    saved = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < KILL_AFTER_UPDATE, saved  # it resumes from partway through

    capsys.readouterr()
    assert main(["train", "--resume", str(killed), "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out

    assert (whole / "metrics.csv").read_text() == (killed / "metrics.csv").read_text()
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, killed))
    assert a["final_return"] == b["final_return"]
    a, b = runner.load(whole), runner.load(killed)
    assert a.update == b.update == 8
    for x, y in zip(_leaves(a.state), _leaves(b.state), strict=True):
        np.testing.assert_array_equal(x, y)
    # The saved final state reproduces the run's own final evaluation.
    np.testing.assert_array_equal(a.evaluate().mean(axis=1), np.asarray(json.loads((whole / "summary.json").read_text())["final_return"], np.float32))


def test_resume_errors_are_one_line_and_touch_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["train", "--algo", "ppo", "--env", "CartPole-v1", *RUNS["ppo"], "--total-steps", "1024", "--no-progress"]
    assert main([*args, "--out", str(run_dir), "--checkpoint-every", "1"]) == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    def check(argv, *needles):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("kl-rl: error: "), err
        for needle in needles:
            assert needle in err[0], err[0]

    check(["train", "--algo", "trpo", "--resume", str(run_dir)], "holds a ppo run", "not --algo trpo")
    check(["train", "--env", "Acrobot-v1", "--resume", str(run_dir)], "not --env Acrobot-v1")
    check(["train", "--resume", str(run_dir), "--lr", "1e-3"], "exactly as configured")
    check(["train", "--resume", str(run_dir)], "already finished")
    check(["train", "--resume", str(tmp_path / "nowhere")], "does not exist")
    check([*args, "--out", str(run_dir), "--checkpoint-every", "2"], "already holds files", "--resume")
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before

    # A checkpoint of another config (other network shapes) is an error, not a crash.
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    config = json.loads((run_dir / "config.json").read_text())
    (unfinished / "config.json").write_text(json.dumps({**config, "hidden_sizes": [8]}))
    (unfinished / "checkpoints").mkdir()
    import shutil

    for step in (run_dir / "checkpoints").iterdir():
        shutil.copytree(step, unfinished / "checkpoints" / step.name)
    check(["train", "--resume", str(unfinished)], "another run")
    # Same record, damaged arrays: also one line.
    (unfinished / "config.json").write_text(json.dumps(config))
    for f in (unfinished / "checkpoints").rglob("*"):
        if f.is_file() and "record" not in str(f):
            f.write_bytes(b"garbage")
    check(["train", "--resume", str(unfinished)], "checkpoint")


def test_a_plain_run_folder_loads_for_evaluation_with_its_normalizer(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--algo", "ppo", "--env", "Pendulum-v1", "--seeds", "2", *RUNS["ppo"], "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    loaded = runner.load(out)
    assert loaded.config.normalize_obs
    norm = jax.tree.map(np.asarray, loaded.state.collector.obs_norm)
    assert np.all(norm.count > 1000) and np.any(norm.mean != 0)
    np.testing.assert_array_equal(loaded.evaluate().mean(axis=1), np.asarray(summary["final_return"], np.float32))
    obs = np.array([[1.0, 0.0, 0.0]], np.float32)
    action = np.asarray(loaded.act(obs, seed=1))
    assert action.shape == (1, 1) and np.all(np.abs(action) <= 2.0)
    # act applies the normalizer: the same as the policy on normalized observations.
    from kl_rl import rollout

    state = loaded.seed_state(1)
    dist = loaded._agent().policy(state.agent, rollout.observe(state.collector.obs_norm, obs, True))
    np.testing.assert_allclose(action, np.clip(np.asarray(dist.mode()), -2, 2))
    with open(out / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * 8
