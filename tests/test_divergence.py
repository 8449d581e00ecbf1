"""Divergence: the bookkeeping on hand-made metrics (first non-finite update, rows, summary), and
through every driver (a sweep point and a tune trial that go non-finite)."""

import json

import numpy as np
import pytest

from kl_rl import divergence, runfolder


def _metrics(seeds=2, updates=6):
    return {
        "env_steps": np.tile(np.arange(1, updates + 1) * 100, (seeds, 1)),
        "kl": np.full((seeds, updates), 0.01, np.float32),
        # NaN until the first episode ends, by design: never a divergence.
        "episode_return": np.full((seeds, updates), np.nan, np.float32),
    }


def test_first_nonfinite_is_the_first_bad_update_per_seed():
    metrics = _metrics()
    metrics["kl"][1, 4] = np.nan  # update 5 of seed 1
    metrics["kl"][1, 5] = np.inf
    assert divergence.first_nonfinite(metrics) == [None, 5]
    metrics["kl"][0, 2] = -np.inf
    assert divergence.first_nonfinite(metrics) == [3, 5]


def test_first_nonfinite_reads_the_training_loops_flag():
    metrics = _metrics(seeds=3)
    metrics["nonfinite"] = np.zeros((3, 6), np.float32)
    metrics["nonfinite"][2, [1, 3]] = 1.0  # parameters went nan, no metric shows it
    assert divergence.first_nonfinite(metrics) == [None, None, 2]


def test_a_diverged_seed_keeps_its_rows_to_the_bad_update_and_leaves_the_statistics():
    metrics = _metrics(seeds=3)
    metrics["kl"][1, 2:] = np.nan  # seed 1 diverges at update 3
    result = runfolder.RunResult(
        algo="ppo",
        env_id="CartPole-v1",
        config=None,
        seeds=[0, 1, 2],
        metrics=metrics,
        eval_returns=np.array([[10.0, 30.0], [np.nan, np.nan], [40.0, 60.0]]),
        wall_time_s=1.0,
        compile_time_s=1.0,
    )
    assert result.diverged == [None, 3, None]
    rows = result.rows()
    assert [(r["seed"], r["update"]) for r in rows if r["seed"] == 1] == [(1, 1), (1, 2), (1, 3)]
    assert len(rows) == 6 + 3 + 6
    assert [r["eval_return"] for r in rows if r["update"] == 6] == [20.0, 50.0]
    assert all(r["eval_return"] is None for r in rows if r["seed"] == 1)
    summary = result.summary()
    assert summary["diverged"] == [None, 3, None] and summary["diverged_seeds"] == 1
    assert summary["final_return"] == [20.0, None, 50.0]
    assert summary["final_return_median"] == summary["final_return_mean"] == summary["final_return_iqm"] == 35.0


# --- divergence through the drivers: a sweep point and a tune trial that go non-finite ---------

DIVERGING = dict(total_steps=2048, num_envs=4, num_steps=64, update_epochs=1, max_grad_norm=1e9)
"""PPO on Pendulum with gradient clipping off: lr 1e6 goes non-finite at the first update."""


def test_a_diverging_sweep_point_is_recorded_per_seed_and_not_ranked(tmp_path, recwarn):
    from kl_rl import sweep

    result = sweep.run_sweep("ppo", "Pendulum-v1", {"lr": [3e-4, 1e6]}, seeds=2, overrides=DIVERGING)
    assert result.diverged[0] == [None, None]
    first = result.diverged[1]
    assert first[0] == 1 and first[1] is not None
    assert result.diverged_items() == [{"point": 1, "seed": s, "update": u} for s, u in enumerate(first)]
    ranking = result.ranking()
    assert [r["point"] for r in ranking] == [0, 1]
    assert np.isfinite(ranking[0]["final_return_iqm"])
    assert ranking[1]["final_return_iqm"] is None and ranking[1]["iqm_ci95"] is None
    assert ranking[1]["diverged"] == [{"seed": s, "update": u} for s, u in enumerate(first)]
    assert np.isnan(result.final_returns[1]).all() and np.isfinite(result.final_returns[0]).all()
    rows = result.rows()
    # A diverged seed's rows end at its first non-finite update.
    assert [(r["seed"], r["update"]) for r in rows if r["point"] == 1] == [
        (s, u) for s in (0, 1) for u in range(1, first[s] + 1)
    ]
    assert all(r["eval_return"] is None for r in rows if r["point"] == 1)
    folder = result.save(tmp_path / "sweep", {})
    assert json.loads((folder / "summary.json").read_text())["diverged_points"] == 1
    # No "Mean of empty slice": a diverged point's nan is never averaged.
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in recwarn]


def test_a_diverging_sweep_exits_3_with_one_line_naming_point_seed_and_update(tmp_path, capsys):
    from kl_rl.cli import main

    out = tmp_path / "sweep"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in DIVERGING.items()]
    args = ["sweep", "--algo", "ppo", "--env", "Pendulum-v1", "--grid", "lr=3e-4,1e6", "--seeds", "2"]
    args += ["--out", str(out)]
    code = main([*args, "--no-progress", *flags])
    captured = capsys.readouterr()
    assert code == 3
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "grid point 1 (lr=1000000.0) diverged: seed 0 at update 1" in lines[0]
    assert "RuntimeWarning" not in captured.err and "Traceback" not in captured.err
    assert "diverged: 2 of 2 seed(s)" in captured.out
    assert (out / "summary.json").exists()
    # kl-rl plot draws the finite point and names the runs it left out.
    assert main(["plot", str(out), "--out", str(tmp_path / "plots")]) == 0
    err = capsys.readouterr().err
    assert "left out lr=1000000 seed 0" in err and "left out lr=1000000 seed 1" in err
    assert (tmp_path / "plots" / "learning_curves.png").exists()
    assert (tmp_path / "plots" / "kl_curves.png").exists()


def test_a_diverging_tune_trial_is_failed_and_the_command_exits_3(tmp_path, capsys):
    pytest.importorskip("optuna")
    from kl_rl import tune
    from kl_rl.cli import main

    space = tune.parse_space("ppo", ["lr=3e-4,1e6"])
    result = tune.run_tune("ppo", "Pendulum-v1", space, trials=2, batch_size=2, seeds=2, storage=None,
                           study_name="diverging", overrides=DIVERGING, startup_trials=0, rungs=2)  # fmt: skip
    states = {t["params"]["lr"]: t for t in result.trials}
    if len(states) == 2:  # the sampler drew both choices
        assert states[1e6]["state"] == "FAIL" and states[1e6]["diverged"][0] == {"seed": 0, "update": 1}
        assert states[3e-4]["state"] == "COMPLETE"
    assert all(t["state"] == "FAIL" for t in result.trials if t["params"]["lr"] == 1e6)
    out = tmp_path / "tune"
    capsys.readouterr()  # Optuna's own log line of the in-memory study above
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in DIVERGING.items()]
    code = main(["tune", "--algo", "ppo", "--env", "Pendulum-v1", "--space", "lr=1e6,1e7", "--trials", "2",
                 "--batch-size", "2", "--seeds", "2", "--rungs", "2", "--sampler-seed", "0", "--out", str(out),
                 "--no-progress", *flags])  # fmt: skip
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(lines) == 1, lines
    assert "diverged: seed 0 at update 1" in lines[0] and "told FAIL" in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["study_trials"] == {"FAIL": 2}
    assert {d["trial"] for d in summary["diverged"]} == {0, 1} and min(d["update"] for d in summary["diverged"]) == 1
