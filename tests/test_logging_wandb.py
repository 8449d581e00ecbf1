"""--wandb (`kl_rl.logging_wandb`) in W&B's offline mode: the local run files, read back, hold
every update's metrics of every seed, as metrics.csv does, with the config and the summary."""

import csv
import json
import re
import sys
import time

import numpy as np
import pytest

from kl_rl import logging_wandb, resolve, runfolder, runner
from kl_rl import sweep as sweep_lib
from kl_rl.cli import main
from kl_rl.errors import ConfigError
from cli_checks import assert_one_line_error
from wandb_files import offline_mode, read_runs

FAST = ["--total-steps", "2048", "--num-envs", "4", "--num-steps", "64", "--update-epochs", "1", "--no-progress"]
KEYS = {"env_steps": "env_steps", "eval_return": "eval/return"}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B in offline mode, writing under the test's tmp_path; yields its wandb/ folder."""
    yield from offline_mode(tmp_path, monkeypatch)


def _csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _expected(row: dict, skip: tuple) -> dict:
    """A metrics.csv row as the W&B history row should hold it: empty cells left out."""
    out = {KEYS.get(k, f"train/{k}"): float(v) for k, v in row.items() if k not in skip and v != ""}
    return {**out, "_step": int(row["update"])}


@pytest.mark.slow
def test_train_logs_every_update_of_every_seed(offline, tmp_path, capsys):
    out = tmp_path / "ppo-cartpole"
    start = time.perf_counter()
    assert main(["train", "--seeds", "2", *FAST, "--out", str(out), "--wandb", "kl-rl-test"]) == 0
    seconds = time.perf_counter() - start
    assert "logged 2 seed(s) to W&B project 'kl-rl-test', group 'ppo-cartpole'" in capsys.readouterr().out
    runs = read_runs(offline)
    summary = json.loads((out / "summary.json").read_text())
    rows = _csv_rows(out / "metrics.csv")
    assert [r["name"] for r in runs] == ["ppo-cartpole-seed0", "ppo-cartpole-seed1"]
    for seed, run in enumerate(runs):
        assert (run["project"], run["group"], run["job_type"]) == ("kl-rl-test", "ppo-cartpole", "train")
        config = run["config"]
        assert (config["seed"], config["algo"], config["total_steps"]) == (seed, "ppo", 2048)
        expected = [_expected(r, ("seed", "update")) for r in rows if int(r["seed"]) == seed]
        assert len(expected) == 8 and expected[-1]["eval/return"] == summary["final_return"][seed]
        assert run["history"] == expected  # every update, every metric, the same values
        assert run["summary"]["final_return"] == summary["final_return"][seed]
        assert run["summary"]["diverged"] is None
        assert run["summary"]["final_return_iqm"] == summary["final_return_iqm"]
    print(f"train with --wandb (2 seeds, offline): {seconds:.1f}s")


def test_train_logs_what_metrics_csv_holds_and_a_diverged_seed_up_to_its_update(offline, tmp_path, monkeypatch, capsys):
    # The training is stood in for (a real run: the slow test above); the CLI writes and logs it.
    config = resolve.resolve_config("ppo", "CartPole-v1", None, {"total_steps": "768", "num_envs": "4"})
    nan = np.nan
    result = runfolder.RunResult(
        algo="ppo", env_id="CartPole-v1", config=config, seeds=[0, 1],
        metrics={
            "env_steps": np.array([[256, 512, 768]] * 2),
            "episode_return": np.array([[nan, 9.5, 21.0], [nan, nan, 11.0]], np.float32),
            "kl": np.array([[0.0123, 0.0456, 0.0789], [0.011, nan, 0.033]], np.float32),  # seed 1 diverges at 2
        },
        eval_returns=np.array([[30.0, 33.0], [0.0, 0.0]]), wall_time_s=1.0, compile_time_s=1.0,
    )  # fmt: skip
    monkeypatch.setattr(runner, "run", lambda *args, **kwargs: result)
    out = tmp_path / "ppo-cartpole"
    assert main(["train", "--seeds", "2", "--out", str(out), "--wandb", "kl-rl-test", "--no-progress"]) == 3
    assert "logged 2 seed(s) to W&B project 'kl-rl-test', group 'ppo-cartpole'" in capsys.readouterr().out
    runs = read_runs(offline)
    rows = _csv_rows(out / "metrics.csv")
    assert [(r["name"], r["group"], r["config"]["seed"], r["config"]["num_envs"]) for r in runs] == [
        ("ppo-cartpole-seed0", "ppo-cartpole", 0, 4), ("ppo-cartpole-seed1", "ppo-cartpole", 1, 4)
    ]  # fmt: skip
    for seed, run in enumerate(runs):
        assert run["history"] == [_expected(r, ("seed", "update")) for r in rows if int(r["seed"]) == seed]
    assert runs[0]["history"][1] == {"_step": 2, "env_steps": 512, "train/episode_return": 9.5,
                                     "train/kl": float(np.float32(0.0456))}  # fmt: skip
    assert runs[0]["history"][2]["eval/return"] == 31.5 == runs[0]["summary"]["final_return"]
    assert runs[1]["history"] == [
        {"_step": 1, "env_steps": 256, "train/kl": float(np.float32(0.011))},
        {"_step": 2, "env_steps": 512},
    ]  # it stops where it went non-finite
    assert runs[1]["summary"]["diverged"] == 2 and runs[1]["summary"]["final_return"] is None
    assert runs[0]["summary"]["final_return_median"] == 31.5


def _sweep_result() -> sweep_lib.SweepResult:
    """Two grid points x two seeds; point 1 runs 2 updates (NaN-padded to 3) and its seed 1
    diverges at update 2."""
    nan = np.nan
    return sweep_lib.SweepResult(
        algo="ppo", env_id="CartPole-v1", grid={"num_steps": [64, 96]}, points=[{"num_steps": 64}, {"num_steps": 96}],
        seeds=[0, 1],
        metrics={
            "env_steps": np.array([[[256, 512, 768]] * 2, [[384, 768, nan]] * 2]),
            "episode_return": np.array([[[nan, 12.5, 20.25], [9.0, 11.0, 30.5]], [[nan, 14.0, nan], [8.0, nan, nan]]]),
            "kl": np.array([[[0.01, 0.02, 0.03], [0.04, 0.05, 0.06]], [[0.07, 0.08, nan], [0.09, np.inf, nan]]]),
        },
        eval_returns=np.array([[[40.0, 42.0], [50.0, 52.0]], [[60.0, 62.0], [70.0, 72.0]]]),
        num_updates=[3, 2], programs=[], diverged=[[None, None], [None, 2]],
    )  # fmt: skip


def test_sweep_logs_one_group_per_grid_point(offline, tmp_path, monkeypatch, capsys):
    result = _sweep_result()
    monkeypatch.setattr(sweep_lib, "run_sweep", lambda *args, **kwargs: result)
    out = tmp_path / "sweep-steps"
    args = ["sweep", "--grid", "num_steps=64,96", "--seeds", "2", "--out", str(out), "--wandb", "kl-rl-test"]
    assert main([*args, "--no-progress"]) == 3  # point 1 diverged: the folder and the logs are written
    assert "logged 2 grid point(s) to W&B project 'kl-rl-test'" in capsys.readouterr().out
    runs = read_runs(offline)
    rows = _csv_rows(out / "metrics.csv")
    assert [(r["group"], r["config"]["point"], r["config"]["seed"], r["config"]["num_steps"]) for r in runs] == [
        ("sweep-steps-point0", 0, 0, 64), ("sweep-steps-point0", 0, 1, 64),
        ("sweep-steps-point1", 1, 0, 96), ("sweep-steps-point1", 1, 1, 96),
    ]  # fmt: skip
    for run in runs:
        point, seed = run["config"]["point"], run["config"]["seed"]
        mine = [r for r in rows if int(r["point"]) == point and int(r["seed"]) == seed]
        assert run["history"] == [_expected(r, ("point", "num_steps", "seed", "update")) for r in mine]
    assert [len(r["history"]) for r in runs] == [3, 3, 2, 2]  # padding dropped; seed 1 stops at its update 2
    assert runs[3]["history"][-1]["train/kl"] == np.inf and runs[3]["summary"]["diverged"] == 2
    assert runs[2]["history"][-1]["eval/return"] == 61.0 and runs[2]["summary"]["final_return"] == 61.0
    assert runs[3]["summary"]["final_return"] is None and "eval/return" not in runs[3]["history"][-1]
    assert runs[0]["summary"]["final_return_iqm"] == pytest.approx(46.0)  # the point's IQM over seeds
    base = json.loads((out / "config.json").read_text())
    assert runs[0]["config"]["lr"] == runs[2]["config"]["lr"] == base["lr"]  # the base config under the point
    assert runs[0]["config"]["seeds"] == 2 and runs[0]["config"]["sweep"] == "sweep-steps"


def test_log_video_logs_the_file(offline, tmp_path):
    from PIL import Image

    path = tmp_path / "play.gif"
    frames = [Image.new("RGB", (8, 6), (40 * i, 0, 0)) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    logging_wandb.log_video("kl-rl-test", "ppo-cartpole", path, config={"seed": 3})
    (run,) = read_runs(offline)
    assert (run["group"], run["name"], run["job_type"], run["config"]) == (
        "ppo-cartpole", "ppo-cartpole-video", "play", {"seed": 3}
    )  # fmt: skip
    (row,) = run["history"]
    assert row["video"]["_type"] == "video-file"
    (logged,) = offline.glob(f"offline-run-*-{run['id']}/files/{row['video']['path']}")
    assert logged.read_bytes() == path.read_bytes()
    with pytest.raises(ConfigError, match="no video file"):
        logging_wandb.log_video("kl-rl-test", "g", tmp_path / "missing.mp4")
    (tmp_path / "play.avi").write_bytes(b"RIFF")
    with pytest.raises(ConfigError, match=re.escape("W&B plays .mp4, .gif, .webm, .ogg videos, not")):
        logging_wandb.log_video("kl-rl-test", "g", tmp_path / "play.avi")
    assert len(read_runs(offline)) == 1  # neither started a W&B run


COMMANDS = {
    "train": ["train"],
    "sweep": ["sweep", "--grid", "lr=1e-3,3e-4"],
    "tune": ["tune", "--space", "lr=log:1e-4:1e-2", "--storage", "journal:{tmp}/journal.log"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_without_wandb_each_command_says_which_extra_and_writes_nothing(command, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    args = [a.replace("{tmp}", str(tmp_path)) for a in COMMANDS[command]]
    code = main([*args, "--out", str(tmp_path / "run"), "--wandb", "kl-rl-test", "--no-progress"])
    assert_one_line_error(capsys, code, "--wandb needs the wandb package; install it with pip install 'kl_rl[wandb]'")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("project", ["", "team/project", "a:b"])
def test_a_project_name_w_and_b_refuses_is_one_line(project, offline, tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "run"), "--wandb", project, "--no-progress"])
    assert_one_line_error(capsys, code, "--wandb takes a W&B project name", repr(project))
    assert not (tmp_path / "run").exists()


def test_online_without_an_api_key_is_one_line_before_training(offline, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    code = main(["train", "--out", str(tmp_path / "run"), "--wandb", "kl-rl-test", "--no-progress"])
    assert_one_line_error(capsys, code, "--wandb logs online but W&B has no API key", "WANDB_MODE=offline")
    assert not (tmp_path / "run").exists()


def test_history_leaves_out_nan_and_stops_at_divergence():
    metrics = {"env_steps": np.array([10.0, 20.0, 30.0]), "kl": np.array([0.5, np.nan, 0.25]),
               "episode_return": np.array([np.nan, 3.0, 4.0])}  # fmt: skip
    assert logging_wandb.history(metrics, 7.5) == [
        {"env_steps": 10.0, "train/kl": 0.5},
        {"env_steps": 20.0, "train/episode_return": 3.0},  # kl nan: diverged at update 2, so it stops
    ]
    metrics["kl"][1] = 0.125
    rows = logging_wandb.history(metrics, 7.5)
    assert len(rows) == 3 and rows[1]["train/kl"] == 0.125 and rows[2]["eval/return"] == 7.5
