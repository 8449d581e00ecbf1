"""Divergence bookkeeping on hand-made metrics: the first non-finite update, rows and summary."""

import numpy as np

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
