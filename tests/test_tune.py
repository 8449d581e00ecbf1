"""kl-rl tune: search spaces, batched trials equal to separate runs, pruning, shared storage, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")

import kl_rl  # noqa: E402
from kl_rl import cli, tune  # noqa: E402
from kl_rl.cli import tune as tune_cli  # noqa: E402
from kl_rl.errors import ConfigError  # noqa: E402
from wandb_files import offline_mode, read_runs  # noqa: E402

# Module-scoped fixtures: the whole file runs on one pytest-xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_tune")

# 8 updates of 4 envs x 64 steps, so 2 rungs of 4 updates (1024 env steps) each.
BASE = dict(total_steps=2048, num_envs=4, num_steps=64, num_minibatches=1, update_epochs=2)
GOOD = {"lr": 1e-3, "clip_eps": 0.2}
BAD = {"lr": 0.3, "clip_eps": 0.2}  # collapses to one action within 3 updates: training return ~9
REPO = Path(__file__).resolve().parents[1]


def test_parse_space_kinds():
    space = tune.parse_space(
        "ppo",
        ["lr=log:1e-5:1e-2", "clip-eps=0.1:0.3", "num_envs=2:8", "num_minibatches=4,8", "hidden_sizes=64:64,32"],
    )
    d = optuna.distributions
    assert space["lr"] == d.FloatDistribution(1e-5, 1e-2, log=True)
    assert space["clip_eps"] == d.FloatDistribution(0.1, 0.3)
    assert space["num_envs"] == d.IntDistribution(2, 8)
    assert space["num_minibatches"] == d.CategoricalDistribution([4, 8])
    # Optuna's choices are scalars, so tuples stay in their CLI spelling until a trial uses them.
    assert space["hidden_sizes"] == d.CategoricalDistribution(["64:64", "32"])
    assert tune.to_overrides("ppo", {"hidden_sizes": "64:64", "lr": 1e-3}) == {"hidden_sizes": "64,64", "lr": 1e-3}
    assert [tune.describe(space[n]) for n in ("lr", "clip_eps", "hidden_sizes")] == [
        "log:1e-05:0.01",
        "0.1:0.3",
        "64:64,32",
    ]
    config = kl_rl.resolve_config("ppo", "CartPole-v1", overrides=tune.to_overrides("ppo", {"hidden_sizes": "64:64"}))
    assert config.hidden_sizes == (64, 64)


@pytest.mark.parametrize(
    "items, needle",
    [
        (["lr"], "malformed space item 'lr'"),
        (["lr=log:1e-5"], "malformed space item"),
        (["lr=1:2:3"], "malformed space item"),
        (["lr=0.1,"], "malformed space item"),
        (["lerning_rate=1e-5:1e-2"], "unknown hyperparameter 'lerning_rate'"),
        (["lr=1e-4:1e-3", "lr=log:1e-4:1e-3"], "names 'lr' twice"),
        (["lr=1e-2:1e-5"], "LOW must be below HIGH"),
        (["lr=0.1:0.1"], "LOW must be below HIGH"),
        (["lr=log:0:1e-2"], "log range needs LOW > 0"),
        (["lr=0:inf"], "lr must be a finite number, got inf"),
        (["total_steps=1000:2000"], "cannot vary total_steps"),
        (["lr=fast:1"], "lr expects float, got 'fast'"),
        (["num_envs=2.5:8"], "num_envs expects int"),
        (["num_minibatches=4,many"], "num_minibatches expects int"),
        (["activation=relu:tanh"], "a range needs a numeric field"),
    ],
)
def test_bad_spaces_are_one_line_config_errors(items, needle):
    with pytest.raises(ConfigError) as err:
        tune.parse_space("ppo", items)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_cem_space_cannot_vary_its_iterations():
    assert tune.parse_space("cem", ["elite_frac=0.1:0.5"])["elite_frac"].high == 0.5
    with pytest.raises(ConfigError, match="cannot vary iterations"):
        tune.parse_space("cem", ["iterations=10,20"])


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    """6 trials in batches of 2: two good configs, two that collapse, two sampled by TPE."""
    storage = f"sqlite:///{tmp_path_factory.mktemp('study') / 'study.db'}"
    study = tune.open_study(storage, "cartpole", startup_trials=2)
    for params in (GOOD, GOOD, BAD, BAD):
        study.enqueue_trial(params)
    lines = []
    space = tune.parse_space("ppo", ["lr=log:1e-4:0.5", "clip_eps=0.1:0.3"])
    result = tune.run_tune(
        "ppo", "CartPole-v1", space, trials=6, batch_size=2, seeds=2, storage=storage, study_name="cartpole",
        overrides=BASE, rungs=2, startup_trials=2, log=lines.append,
    )  # fmt: skip
    return result, optuna.load_study(study_name="cartpole", storage=storage), lines


def test_study_holds_every_trial_finished_and_programs_are_compiled_once(study_run):
    result, study, lines = study_run
    trials = study.get_trials()
    assert [t.number for t in trials] == [t["number"] for t in result.trials] == list(range(6))
    assert all(t.state.is_finished() and t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert [t["state"] for t in result.trials[:4]] == ["COMPLETE", "COMPLETE", "PRUNED", "PRUNED"]
    # init, one rung of 4 updates and evaluate: compiled in batch 1 and reused by batches 2 and 3.
    assert result.compiled_programs == 3
    assert "3 program(s) compiled" in lines[0] and "0 program(s) compiled" in lines[1] and "0 program(s)" in lines[2]
    sampled = [t.params for t in trials[4:]]
    assert sampled[0] != sampled[1]
    for params in sampled:
        assert set(params) == {"lr", "clip_eps"}
        assert 1e-4 <= params["lr"] <= 0.5 and 0.1 <= params["clip_eps"] <= 0.3
    assert result.study_counts["COMPLETE"] + result.study_counts["PRUNED"] == 6
    assert result.best["value"] == max(t.value for t in trials if t.state.name == "COMPLETE")


def test_a_trial_equals_a_separate_run_and_reports_its_training_return(study_run):
    result, study, _ = study_run
    alone = kl_rl.run("ppo", "CartPole-v1", seeds=2, **BASE, **GOOD)
    np.testing.assert_allclose(result.trials[0]["final_return"], alone.final_returns, rtol=1e-5)
    assert study.trials[0].value == pytest.approx(float(alone.final_returns.mean()), rel=1e-5)
    # Each rung reports the mean over seeds of the latest training return, at its env steps.
    reported = study.trials[0].intermediate_values
    assert sorted(reported) == [1024, 2048]
    expected = alone.metrics["episode_return"][:, [3, 7]].mean(axis=0)
    np.testing.assert_allclose([reported[1024], reported[2048]], expected, rtol=1e-5)
    # The trial's per-update metrics (what --wandb logs) are the run's.
    assert set(result.metrics[0]) == set(alone.metrics)
    for name, values in alone.metrics.items():
        np.testing.assert_allclose(result.metrics[0][name], values, rtol=1e-5, err_msg=name)


def test_the_median_pruner_stops_collapsed_trials_after_the_first_rung(study_run):
    result, study, _ = study_run
    for number in (2, 3):
        trial = study.trials[number]
        assert trial.state == optuna.trial.TrialState.PRUNED
        assert list(trial.intermediate_values) == [1024]
        # Both trials of the group were pruned, so the group stopped: no second rung was run.
        assert result.trials[number]["env_steps"] == 1024
        assert trial.intermediate_values[1024] < study.trials[0].intermediate_values[1024]
        assert result.trials[number]["pruned_at_env_steps"] == 1024 and result.trials[number]["value"] is None
        # Its metrics end at the rung it was pruned at: 4 updates of 256 env steps.
        assert result.metrics[number]["env_steps"].tolist() == [[256, 512, 768, 1024]] * 2
    assert [t["env_steps"] for t in result.trials[:2]] == [2048, 2048]


def test_save_writes_one_row_per_trial(study_run, tmp_path):
    result, _, _ = study_run
    out = result.save(tmp_path / "tune")
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",") == [
        "number", "state", "lr", "clip_eps", "value", "final_return_mean", "final_return_iqm", "pruned_at_env_steps"
    ]  # fmt: skip
    assert len(lines) == 1 + 6
    config = json.loads((out / "config.json").read_text())
    assert config["space"] == {"lr": "log:0.0001:0.5", "clip_eps": "0.1:0.3"} and config["total_steps"] == 2048
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"]["number"] == result.best["number"] and summary["study_name"] == "cartpole"
    assert [t["number"] for t in summary["trials"]] == list(range(6))
    assert summary["batching"] == config["batching"] == "map"  # the platform's default, as it ran


def test_a_pruned_trials_metrics_end_at_its_rung_while_its_group_trains_on():
    # Two trials x two seeds (items trial-major) and a padding item, 3 updates of 100 env steps;
    # trial 1 was pruned after update 2, trial 0 ran to the end.
    metrics = {"kl": np.arange(15.0).reshape(5, 3), "env_steps": np.tile([100, 200, 300], (5, 1))}
    records = [{"pruned_at_env_steps": None}, {"pruned_at_env_steps": 200}]
    first, second = tune.trial_metrics(metrics, records, seeds=2, steps_per_update=100)
    assert first["kl"].tolist() == [[0, 1, 2], [3, 4, 5]] and first["env_steps"].shape == (2, 3)
    assert second["kl"].tolist() == [[6, 7], [9, 10]] and second["env_steps"].tolist() == [[100, 200]] * 2


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B in offline mode, writing under the test's tmp_path; yields its wandb/ folder."""
    yield from offline_mode(tmp_path, monkeypatch)


def test_wandb_logs_one_group_per_trial(study_run, offline, tmp_path, monkeypatch, capsys):
    import dataclasses

    full, _, _ = study_run
    # A complete and a pruned trial of the study above, as this worker's, through the CLI.
    kept = (0, 2)
    result = dataclasses.replace(full, trials=[full.trials[n] for n in kept],
                                 metrics={n: full.metrics[n] for n in kept})  # fmt: skip
    monkeypatch.setattr(tune, "run_tune", lambda *args, **kwargs: result)
    out = tmp_path / "tune-ppo"
    args = ["--space", "lr=log:1e-4:0.5", "clip_eps=0.1:0.3", "--out", str(out), "--wandb", "kl-rl-test"]
    assert cli.main(["tune", *args, "--storage", f"sqlite:///{tmp_path / 's.db'}", "--no-progress"]) == 0
    assert "logged 2 trial(s) to W&B project 'kl-rl-test', groups tune-ppo-trial<N>" in capsys.readouterr().out
    runs = read_runs(offline)
    groups = [(r["group"], r["config"]["seed"]) for r in runs]
    assert groups == [(f"tune-ppo-trial{n}", s) for n in kept for s in (0, 1)]
    for run in runs:
        number, seed = run["config"]["trial"], run["config"]["seed"]
        trial = full.trials[number]
        assert run["config"]["lr"] == trial["params"]["lr"] and run["config"]["total_steps"] == 2048
        assert run["summary"]["state"] == trial["state"] and run["summary"]["value"] == trial["value"]
        metrics = full.metrics[number]
        assert [row["_step"] for row in run["history"]] == list(range(1, metrics["env_steps"].shape[1] + 1))
        assert [row["train/kl"] for row in run["history"]] == metrics["kl"][seed].tolist()
        assert [row["env_steps"] for row in run["history"]] == metrics["env_steps"][seed].tolist()
        final = trial["final_return"]
        assert run["history"][-1].get("eval/return") == (final[seed] if final else None)
    assert [len(r["history"]) for r in runs] == [8, 8, 4, 4]  # the pruned trial's stop at its rung


def test_sampled_configs_that_fail_validation_are_failed_trials(tmp_path):
    # 3 and 5 minibatches do not divide the 256-transition batch: no trial trains, nothing compiles.
    storage = f"sqlite:///{tmp_path / 'fail.db'}"
    lines = []
    space = tune.parse_space("ppo", ["num_minibatches=3,5"])
    result = tune.run_tune("ppo", "CartPole-v1", space, 2, 2, 1, storage, "fail", overrides=BASE, log=lines.append)
    assert [t["state"] for t in result.trials] == ["FAIL", "FAIL"] and result.best is None
    assert "does not divide" in lines[0] and lines[-1].startswith("batch 1/1: 2 trial(s)")
    study = optuna.load_study(study_name="fail", storage=storage)
    assert "does not divide" in study.trials[0].user_attrs["error"]

    def interrupt(line):
        raise KeyboardInterrupt

    # Interrupted mid-batch: the trial not yet started is failed too, none is left RUNNING.
    with pytest.raises(KeyboardInterrupt):
        tune.run_tune("ppo", "CartPole-v1", space, 2, 2, 1, storage, "fail", overrides=BASE, log=interrupt)
    assert [t.state.name for t in study.get_trials()] == ["FAIL"] * 4


@pytest.fixture
def tune_command():
    """`kl-rl tune` through cli.main."""
    return lambda *args: cli.main(["tune", *args])


FAST = ["--total-steps", "1024", "--num-envs", "4", "--num-steps", "64", "--num-minibatches", "1",
        "--update-epochs", "1", "--rungs", "2", "--seeds", "1", "--no-progress"]  # fmt: skip


@pytest.mark.parametrize(
    "storage",
    ["postgresql://nohost:1/x", "sqlite:////nonexistent/dir/x.db", "notadb://x", "postgresql://me:secret@nohost/x",
     "journal:/nonexistent/dir/x.log", "journal:"],
)  # fmt: skip
def test_unusable_storage_is_one_line_and_writes_nothing(tmp_path, capsys, tune_command, storage):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "summary.json").write_text("{}")
    for out in (keep, tmp_path / "new"):
        assert tune_command("--space", "lr=1e-4:1e-3", "--storage", storage, "--out", str(out), *FAST) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("kl-rl: error: cannot open Optuna storage"), err
        assert "sqlite:///study.db" in err[0] and "journal:PATH" in err[0] and "secret" not in err[0]
    assert [p.name for p in keep.iterdir()] == ["summary.json"] and (keep / "summary.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


@pytest.mark.parametrize(
    "args, needle",
    [
        ([], "--space needs at least one item"),
        (["--space", "lr=1e-2:1e-5"], "LOW must be below HIGH"),
        (["--space", "lr=1e-4:1e-3", "--trials", "0"], "--trials must be a positive integer"),
        (["--space", "lr=1e-4:1e-3", "--batch-size", "two"], "--batch-size expects int"),
        (["--space", "lr=1e-4:1e-3", "--lerning-rate", "1"], "unknown hyperparameter"),
        (["--algo", "cem", "--space", "elite_frac=0.1:0.5", "--total-steps", "1000"], "--total-steps does not apply"),
        (["--space", "lr=1e-4:1e-3", "--batching", "VMAP"], "--batching must be one of map, vmap, got 'VMAP'"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, capsys, tune_command, args, needle):
    out = tmp_path / "run"
    assert tune_command("--out", str(out), "--storage", f"sqlite:///{tmp_path / 's.db'}", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_help_and_an_empty_range(capsys, tune_command):
    assert tune_command("--help") == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: kl-rl tune --algo ALGO --env ENV --space") and "--storage" in printed
    assert tune_command("--space", "lr=0.1:0.1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kl-rl: error: --space lr=0.1:0.1: LOW must be below HIGH"), err


def test_without_optuna_tune_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now raises ImportError
    with pytest.raises(ConfigError, match=r"needs Optuna; install it with pip install 'kl_rl\[tune\]'"):
        tune_cli.main(["--space", "lr=1e-4:1e-3"])


# Slow: the default tier's two-worker check is the journal race below (exact trial numbers).
@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path):
    # Worker a uses the default storage next to its folder; worker b joins it by URL and name.
    storage = f"sqlite:///{tmp_path / 'shared.study.db'}"
    common = ["--space", "lr=log:1e-4:1e-2", "clip_eps=0.1:0.3", "--trials", "2", "--batch-size", "2", *FAST]
    commands = {
        "a": ["--out", str(tmp_path / "shared"), "--sampler-seed", "1"],
        "b": ["--out", str(tmp_path / "b"), "--storage", storage, "--study-name", "shared", "--sampler-seed", "2"],
    }
    # Each worker compiles its own programs, with conftest's fast-compile XLA_FLAGS (inherited).
    env = {**os.environ, "PYTHONPATH": str(REPO), "KL_RL_CACHE_DIR": "off"}
    workers = {
        name: subprocess.Popen(
            [sys.executable, "-m", "kl_rl.cli", "tune", *common, *args],
            env=env,
            cwd=tmp_path,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, args in commands.items()
    }
    outputs = {name: worker.communicate(timeout=240) for name, worker in workers.items()}
    for name, worker in workers.items():
        assert worker.returncode == 0, outputs[name][1]
        assert "best: trial" in outputs[name][0]
    assert f"study 'shared' in {storage}" in outputs["a"][0]
    study = optuna.load_study(study_name="shared", storage=storage)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    # Each worker's sampler has its own seed, so no two trials share their params.
    assert len({(t.params["lr"], t.params["clip_eps"]) for t in study.trials}) == 4
    assert all(1e-4 <= t.params["lr"] <= 1e-2 and 0.1 <= t.params["clip_eps"] <= 0.3 for t in study.trials)
    mine = {}
    for name, folder in (("a", "shared"), ("b", "b")):
        summary = json.loads((tmp_path / folder / "summary.json").read_text())
        mine[name] = {t["number"] for t in summary["trials"]}
        assert len(mine[name]) == 2 and summary["study_name"] == "shared"
        assert sum(summary["study_trials"].values()) >= 2
        assert len((tmp_path / folder / "metrics.csv").read_text().splitlines()) == 1 + 2
    assert mine["a"] | mine["b"] == {0, 1, 2, 3}


def test_a_journal_file_is_a_storage_workers_can_share(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = tune.open_study("journal:study.log", "s", sampler_seed=1)  # relative to the working folder
    first.tell(first.ask(), 1.0)
    again = tune.open_study(f"journal:{tmp_path / 'study.log'}", "s", sampler_seed=2)
    assert [(t.number, t.value) for t in again.trials] == [(0, 1.0)]
    assert isinstance(again._storage, optuna.storages.JournalStorage)


# Slow, beside test_two_workers_share_one_study, to keep the default tier within its 10 minutes; the
# default tier opens a journal study (test_a_journal_file_is_a_storage_workers_can_share).
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_two_workers_started_together_lose_and_repeat_no_trial(tmp_path, kind):
    # Two workers from the first moment, on a storage neither has created: their asks, reports
    # and tells interleave, batch after batch. The study must hold exactly the sum of their trials.
    storage = f"journal:{tmp_path / 'study.log'}" if kind == "journal" else f"sqlite:///{tmp_path / 'study.db'}"
    common = ["--space", "lr=log:1e-4:1e-2", "--trials", "3", "--batch-size", "2", "--storage", storage,
              "--study-name", "shared", *FAST]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "KL_RL_CACHE_DIR": "off"}
    commands = [[*common, "--out", str(tmp_path / f"w{i}"), "--sampler-seed", str(i)] for i in (1, 2)]
    pipes = dict(env=env, cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    workers = [subprocess.Popen([sys.executable, "-m", "kl_rl.cli", "tune", *args], **pipes) for args in commands]
    outputs = [worker.communicate(timeout=240) for worker in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="shared", storage=tune._storage(storage))
    assert sorted(t.number for t in study.trials) == list(range(6))
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    mine = [{t["number"] for t in json.loads((tmp_path / f"w{i}" / "summary.json").read_text())["trials"]}
            for i in (1, 2)]  # fmt: skip
    assert len(mine[0]) == len(mine[1]) == 3 and mine[0] | mine[1] == set(range(6))
