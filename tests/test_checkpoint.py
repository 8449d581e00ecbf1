"""Checkpoints: a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from kl_rl import checkpoint, resolve, runfolder
from kl_rl.cli import main

# Module-scoped fixtures: the whole file runs on one pytest-xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_checkpoint")

ROOT = Path(__file__).resolve().parents[1]

# Small runs of 8 updates. PPO checkpoints every 3 (so its last segment is shorter), the others
# every 2. Each is killed during update 7, after at least one checkpoint was complete.
RUNS = {
    "ppo": ["--total-steps", "4096", "--num-envs", "4", "--num-steps", "128", "--normalize-obs", "true"],
    "trpo": ["--total-steps", "4096", "--num-envs", "4", "--num-steps", "128", "--vf-minibatches", "4"],
    "cem": ["--iterations", "8", "--population-size", "8"],
}
EVERY = {"ppo": "3", "trpo": "2", "cem": "2"}
KILL_AFTER_UPDATE = 7

# Runs the CLI in a process that SIGKILLs itself (from the progress report between two compiled
# segments) once KILL_AFTER_UPDATE updates are done: no cleanup, no flush, with the next segment
# already dispatched, possibly while an asynchronous checkpoint save is still writing.
KILLER = """
import os, signal, sys
from kl_rl import cli, runner

real_run = runner.run
def run(*args, **kwargs):
    def progress(env_steps, total):
        if env_steps >= {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)
    kwargs["progress"] = progress
    return real_run(*args, **kwargs)
runner.run = run
sys.exit(cli.main(sys.argv[1:]))
"""


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(checkpoint.to_storable(tree))]


def _steps_per_update(algo: str, flags: list[str]) -> int:
    """Env steps per update, summed over the 2 seeds, of the run `flags` make."""
    from kl_rl import envs
    from kl_rl.cli.common import parse_overrides
    from kl_rl.train import make_trainer

    config = resolve.resolve_config(algo, "CartPole-v1", None, parse_overrides(flags))
    return make_trainer(algo, config, envs.make("CartPole-v1")).steps_per_update * 2


# The default tier kills and resumes PPO; TRPO's and CEM's runs (the same checkpoint code, their own
# states) are slow, which keeps the default tier within its 10 minutes.
@pytest.mark.parametrize("algo", [a if a == "ppo" else pytest.param(a, marks=pytest.mark.slow) for a in sorted(RUNS)])
def test_sigkill_then_resume_is_bit_identical(tmp_path, algo):
    args = ["train", "--algo", algo, "--env", "CartPole-v1", "--seeds", "2", "--checkpoint-every", EVERY[algo]]
    args += RUNS[algo]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    kill_at = _steps_per_update(algo, RUNS[algo]) * KILL_AFTER_UPDATE
    # Three processes, as a user would run them, one after another and sharing one compilation
    # cache: the uninterrupted run compiles, the run to kill and the resumed one load its programs
    # (compiling them again would check XLA, not the checkpoints, and cost most of the test's time).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KL_RL_CACHE_DIR": str(tmp_path / "xla")}
    cli = [sys.executable, "-m", "kl_rl.cli"]
    done = subprocess.run(
        [*cli, *args, "--no-progress", "--out", str(whole)], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    to_kill = subprocess.run(
        [sys.executable, "-c", KILLER.format(kill_at=kill_at), *args, "--out", str(killed)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert to_kill.returncode == -9, to_kill.stderr[-2000:]
    assert not (killed / "summary.json").exists()
    saved = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < KILL_AFTER_UPDATE, saved  # it resumes from partway through

    resumed = subprocess.run(
        [*cli, "train", "--resume", str(killed), "--no-progress"], env=env, capture_output=True, text=True, check=False
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"from update {max(saved)}" in resumed.stdout, resumed.stdout

    assert (whole / "metrics.csv").read_text() == (killed / "metrics.csv").read_text()
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, killed))
    assert a["final_return"] == b["final_return"]
    a, b = runfolder.load(whole), runfolder.load(killed)
    assert a.update == b.update == 8
    for x, y in zip(_leaves(a.state), _leaves(b.state), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """A finished PPO Pendulum run folder (no --checkpoint-every), with observation normalization."""
    out = tmp_path_factory.mktemp("plain") / "run"
    args = ["train", "--algo", "ppo", "--env", "Pendulum-v1", "--seeds", "2", *RUNS["ppo"], "--no-progress"]
    assert main([*args, "--tensorboard", "--out", str(out)]) == 0
    return out


def test_the_cli_writes_tensorboard_events_on_request(plain_run, capsys, monkeypatch, tmp_path):
    assert sorted(p.name for p in (plain_run / "tensorboard").iterdir()) == ["seed_0", "seed_1"]
    events = _events(plain_run / "tensorboard" / "seed_1")
    assert {"train/kl", "train/episode_return", "eval/return"} <= set(events)
    assert [step for step, _ in events["train/kl"]] == [512 * u for u in range(1, 9)]
    # Without the extra: one line naming it, before anything trains.
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    capsys.readouterr()
    assert main(["train", "--tensorboard", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kl-rl: error: --tensorboard needs tensorboardX; install it with pip install 'kl_rl[tensorboard]'"]
    assert not (tmp_path / "x").exists()


def test_resume_errors_are_one_line_and_touch_nothing(tmp_path, capsys, plain_run):
    run_dir = plain_run
    args = ["train", "--algo", "ppo", "--env", "Pendulum-v1", *RUNS["ppo"], "--no-progress"]
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    def check(argv, *needles):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("kl-rl: error: "), err
        for needle in needles:
            assert needle in err[0], err[0]

    check(["train", "--algo", "trpo", "--resume", str(run_dir)], "holds a ppo run", "not --algo trpo")
    check(["train", "--env", "CartPole-v1", "--resume", str(run_dir)], "not --env CartPole-v1")
    check(["train", "--resume", str(run_dir), "--lr", "1e-3"], "exactly as configured")
    check(["train", "--resume", str(run_dir)], "already finished")
    check(["train", "--resume", str(tmp_path / "nowhere")], "does not exist")
    check([*args, "--out", str(run_dir), "--checkpoint-every", "2"], "already holds files", "--resume")
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before

    # A checkpoint of another config (other network shapes) is an error, not a crash.
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir / "checkpoints", unfinished / "checkpoints")
    config = json.loads((run_dir / "config.json").read_text())
    (unfinished / "config.json").write_text(json.dumps({**config, "hidden_sizes": [8]}))
    check(["train", "--resume", str(unfinished)], "another run", "resume with that run's settings")
    # The right run, but its newest checkpoint lost its arrays, or they are garbage.
    (unfinished / "config.json").write_text(json.dumps(config))
    shutil.rmtree(unfinished / "checkpoints" / "8" / "state")
    check(["train", "--resume", str(unfinished)], "does not match this run or is damaged")
    shutil.rmtree(unfinished / "checkpoints")
    shutil.copytree(run_dir / "checkpoints", unfinished / "checkpoints")
    for f in (unfinished / "checkpoints" / "8" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    check(["train", "--resume", str(unfinished)], "does not match this run or is damaged")
    assert not (unfinished / "summary.json").exists()


def test_a_plain_run_folder_loads_for_evaluation_with_its_normalizer(plain_run):
    out = plain_run
    summary = json.loads((out / "summary.json").read_text())
    loaded = runfolder.load(out)
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


def _events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} read back from a TensorBoard event file (TFRecord of Event protos)."""
    import struct

    from tensorboardX.proto import event_pb2

    (path,) = folder.glob("events.out.tfevents.*")
    data, out, i = path.read_bytes(), {}, 0
    while i < len(data):
        (length,) = struct.unpack("<Q", data[i : i + 8])
        event = event_pb2.Event.FromString(data[i + 12 : i + 12 + length])
        i += 12 + length + 4
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tensorboard_event_files_hold_the_metrics(tmp_path):
    result = runfolder.RunResult(
        algo="ppo",
        env_id="CartPole-v1",
        config=None,
        seeds=[0, 3],
        metrics={
            "env_steps": np.array([[100, 200], [100, 200]]),
            "kl": np.array([[0.01, 0.02], [0.03, np.nan]], np.float32),
        },
        eval_returns=np.array([[10.0, 20.0], [30.0, 50.0]]),
        wall_time_s=1.0,
        compile_time_s=1.0,
    )
    folder = result.write_tensorboard(tmp_path / "tb")
    assert sorted(p.name for p in folder.iterdir()) == ["seed_0", "seed_3"]
    seed0, seed3 = _events(folder / "seed_0"), _events(folder / "seed_3")
    np.testing.assert_allclose(seed0["train/kl"], [(100, 0.01), (200, 0.02)], rtol=1e-6)
    np.testing.assert_allclose(seed3["train/kl"], [(100, 0.03)], rtol=1e-6)  # NaN (no episode yet) is skipped
    assert seed0["eval/return"] == [(200, 15.0)] and seed3["eval/return"] == [(200, 40.0)]


def test_a_run_folder_records_its_batching_and_resume_reads_it(tmp_path):
    config = resolve.resolve_config("ppo", "CartPole-v1", None, {})
    for batching in ("vmap", None):  # None: a folder from before the choice
        saved = runfolder.run_config("ppo", "CartPole-v1", [0, 1], config, 2, batching=batching)
        if batching is None:
            del saved["batching"]
        (tmp_path / "config.json").write_text(json.dumps(saved))
        spec = runfolder.read_run_config(tmp_path)
        assert spec.batching == batching and spec.config == config  # batching is no hyperparameter
