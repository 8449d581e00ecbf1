import warnings

import numpy as np
import pytest
import scipy.stats
from fake_runs import episode_return, write_sweep, write_train_run, write_tune

from kl_rl import analysis, stats
from kl_rl.errors import ConfigError

# --- aggregates on hand-computed inputs ---------------------------------------------------------


def test_iqm_hand_computed():
    assert analysis.iqm(np.arange(1, 9)) == pytest.approx(4.5)  # mean(3, 4, 5, 6)
    # n = 5: cuts at 1.25 and 3.75, so the 2nd and 4th sorted scores count 3/4 and the 3rd fully:
    # (0.75 * 2 + 3 + 0.75 * 4) / 2.5 = 3; the outlier 10 does not count.
    assert analysis.iqm([10, 4, 1, 3, 2]) == pytest.approx(3.0)


def test_iqm_matches_runner_and_trim_mean():

    rng = np.random.default_rng(0)
    for n in range(1, 21):
        x = rng.normal(size=n)
        assert analysis.iqm(x) == pytest.approx(stats.iqm(x), abs=1e-12)
    # Pooled over tasks; with 80 scores the 25% cut is a whole number, so it is scipy's trimmed mean.
    scores = rng.normal(size=(16, 5)) + np.arange(5)
    assert analysis.iqm(scores) == pytest.approx(scipy.stats.trim_mean(scores.ravel(), 0.25))
    batch = rng.normal(size=(7, 16, 5))
    np.testing.assert_allclose(analysis.iqm(batch), [analysis.iqm(b) for b in batch])


def test_mean_median_optimality_gap_hand_computed():
    scores = np.array([[0.0, 1.0, 10.0], [2.0, 3.0, 50.0]])  # task means 1, 2, 30
    assert analysis.mean(scores) == pytest.approx(11.0)
    assert analysis.median(scores) == pytest.approx(2.0)  # the median of the task means
    # max(1 - x, 0) = 0.5, 0, 0.1, 1.1
    assert analysis.optimality_gap([[0.5, 1.2], [0.9, -0.1]]) == pytest.approx(1.7 / 4)
    assert analysis.optimality_gap([[0.5, 1.2], [0.9, -0.1]], gamma=0.5) == pytest.approx(0.6 / 4)
    normalized = analysis.normalize([[0.0, 10.0], [50.0, 20.0]], low=[0, 10], high=[100, 30])
    np.testing.assert_allclose(normalized, [[0, 0], [0.5, 0.5]])


def test_probability_of_improvement_hand_computed():
    # Task 1, x = 1, 2, 3 against y = 0, 2, 4: wins 1, 1 + 1/2 (tie), 2 -> 4.5 / 9.
    # Task 2, x = 1, 2, 3 against y = 0, 2, 2: wins 1, 1 + 2 * 1/2, 3 -> 6 / 9.
    x = np.array([[1, 1], [2, 2], [3, 3]])
    y = np.array([[0, 0], [2, 2], [4, 2]])
    result = analysis.probability_of_improvement(x, y, reps=500)
    assert result.estimate == pytest.approx((4.5 / 9 + 6 / 9) / 2)
    assert result.low <= result.estimate <= result.high
    for t in range(2):
        u = scipy.stats.mannwhitneyu(x[:, t], y[:, t]).statistic  # counts ties 1/2
        assert analysis.probability_of_improvement(x[:, t], y[:, t], reps=10).estimate == pytest.approx(u / 9)
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 5, size=(6, 3)), rng.integers(0, 5, size=(4, 3))
    pa = analysis.probability_of_improvement(a, b, reps=10).estimate
    assert pa + analysis.probability_of_improvement(b, a, reps=10).estimate == pytest.approx(1.0)
    assert analysis.probability_of_improvement(a + 10, b, reps=100) == (1.0, 1.0, 1.0)


def test_performance_profile_hand_computed():
    scores = np.array([[0.1, 0.5], [0.4, 0.9], [0.7, 1.0]])
    taus = [0.0, 0.45, 0.95]
    run = analysis.performance_profile(scores, taus, reps=500)
    # Task 1: 3/3, 1/3, 0 above; task 2: 3/3, 3/3, 1/3.
    np.testing.assert_allclose(run.fraction, [1.0, 2 / 3, 1 / 6])
    assert np.all(run.low <= run.fraction) and np.all(run.fraction <= run.high)
    assert np.all((run.low >= 0) & (run.high <= 1))
    average = analysis.performance_profile(scores, taus, reps=500, kind="average")
    np.testing.assert_allclose(average.fraction, [1.0, 0.5, 0.0])  # task means 0.4 and 0.8
    default = analysis.performance_profile(scores, reps=10)
    assert len(default.taus) == 101 and np.all(np.diff(default.fraction) <= 0)


# --- the stratified bootstrap -------------------------------------------------------------------


def test_stratified_resample_stays_within_each_task():
    rng = np.random.default_rng(0)
    # Task t's scores lie in [100 t, 100 t + 10]: a resample mixing tasks would leave the range.
    scores = rng.uniform(0, 10, size=(6, 4)) + 100 * np.arange(4)
    samples = analysis.stratified_resample(scores, 2000, rng)
    assert samples.shape == (2000, 6, 4)
    for t in range(4):
        assert np.isin(samples[:, :, t], scores[:, t]).all()
    task_means = samples.mean(axis=1)
    assert np.all((task_means >= scores.min(axis=0)) & (task_means <= scores.max(axis=0)))
    # Runs are drawn independently per task: the resampled rows are not whole rows of the input.
    assert not all(any(np.array_equal(row, s) for s in scores) for row in samples[0])


def test_interval_estimates_table_and_determinism():
    rng = np.random.default_rng(0)
    scores = {"ppo": rng.normal(1, 0.2, size=(10, 3)), "trpo": rng.normal(0.5, 0.2, size=(8, 3))}
    table = analysis.interval_estimates(scores, reps=2000)
    assert list(table.columns) == ["algo", "metric", "estimate", "low", "high"]
    assert len(table) == 8 and list(table["metric"][:4]) == ["mean", "median", "iqm", "optimality_gap"]
    assert np.all(table["low"] <= table["estimate"]) and np.all(table["estimate"] <= table["high"])
    ppo = table[table["algo"] == "ppo"].set_index("metric")["estimate"]
    assert ppo["iqm"] == pytest.approx(analysis.iqm(scores["ppo"]))
    reversed_order = analysis.interval_estimates(dict(reversed(scores.items())), reps=2000)
    assert (
        table.sort_values(["algo", "metric"])
        .reset_index(drop=True)
        .equals(reversed_order.sort_values(["algo", "metric"]).reset_index(drop=True))
    )
    basic = analysis.interval_estimates(scores, ["mean"], reps=2000, method="basic")
    pct = table[table["metric"] == "mean"].reset_index(drop=True)
    # basic reflects the percentile interval about the estimate.
    np.testing.assert_allclose(basic["low"], 2 * pct["estimate"] - pct["high"])
    custom = analysis.interval_estimates(scores, {"max": lambda x: x.max(axis=(-2, -1))}, reps=100)
    assert custom["estimate"][0] == pytest.approx(scores["ppo"].max())
    with pytest.raises(ConfigError, match="unknown metric"):
        analysis.interval_estimates(scores, ["best"])


def test_interval_estimates_speed():
    import time

    rng = np.random.default_rng(0)
    scores = {f"algo{i}": rng.normal(size=(16, 5)) for i in range(4)}
    start = time.perf_counter()
    analysis.interval_estimates(scores, reps=10_000)
    # Four algorithms x four metrics x 10,000 resamples: about 0.2 s on a loaded 2-core machine;
    # the bound leaves room for a slower CI machine.
    assert time.perf_counter() - start < 1.5


def test_bootstrap_coverage():
    """The 95% CIs of the mean and the IQM cover the population value about 95% of the time.

    Data: 300 data sets of 16 runs x 5 tasks from N(1, 1); both the mean and, by symmetry, the IQM
    of the population are 1. Expected coverage is below 0.95: the stratified bootstrap's variance of
    a task mean is the plug-in s^2 / n, smaller than the unbiased one by (n - 1) / n = 15/16, so the
    percentile interval is a z-interval at 1.96 * sqrt(15/16) = 1.90, which covers 0.943 (and a
    little less from the normal-vs-t tail at 80 scores). With 300 data sets the binomial SD of the
    coverage is sqrt(0.94 * 0.06 / 300) = 0.014, so 3 SD is [0.90, 0.98]; the IQM's small-sample
    percentile bias has no closed form, so the bounds are widened to [0.88, 0.99].
    """
    rng = np.random.default_rng(2021)
    data = rng.normal(1.0, 1.0, size=(300, 16, 5))
    covered = {"mean": 0, "iqm": 0}
    for i, scores in enumerate(data):
        table = analysis.interval_estimates({"a": scores}, ["mean", "iqm"], reps=1000, seed=i)
        for row in table.itertuples():
            covered[row.metric] += row.low <= 1.0 <= row.high
    for metric, count in covered.items():
        assert 0.88 <= count / len(data) <= 0.99, (metric, count / len(data))


def test_curve_intervals_resample_whole_curves():
    curves = np.array([[0.0, 1.0, 2.0], [2.0, 3.0, 4.0], [4.0, 5.0, 6.0]])
    estimate, lo, hi = analysis.curve_intervals(curves, reps=500)
    np.testing.assert_allclose(estimate, [2.0, 3.0, 4.0])
    # Each curve is the first plus a constant: resampling whole curves keeps the band's shape.
    np.testing.assert_allclose(np.diff(lo), 1.0)
    np.testing.assert_allclose(np.diff(hi), 1.0)
    np.testing.assert_allclose(analysis.curve_estimate(curves, "iqm"), [2.0, 3.0, 4.0])


# --- loading folders ----------------------------------------------------------------------------


@pytest.fixture
def folders(tmp_path):
    train = write_train_run(tmp_path / "ppo_run", seeds=3, updates=8, wall_time_s=2.0)
    sweep = write_sweep(tmp_path / "lr_sweep", grid={"lr": [3e-4, 1e-3], "clip_eps": [0.1]}, seeds=2, updates=4)
    return train, sweep


def test_load_train_and_sweep(folders):
    train, sweep = folders
    df = analysis.load([train, sweep])
    assert list(df.columns[:9]) == ["run", "path", "kind", "algo", "env", "point", "lr", "clip_eps", "seed"]
    assert list(df.columns[9:13]) == ["update", "env_steps", "episode_return", "episode_length"]
    assert list(df.columns[-2:]) == ["eval_return", "wall_time_s"]
    assert analysis.hyperparameters(df) == ["lr", "clip_eps"]
    assert len(df) == 3 * 8 + 2 * 2 * 4
    runs = df.groupby("run")
    assert runs["kind"].first().to_dict() == {"ppo_run": "train", "lr_sweep": "sweep"}
    t = df[df["run"] == "ppo_run"]
    assert t["point"].eq(0).all() and t["lr"].isna().all()
    # The train run's annealed-lr metric is `lr_metric`, as in the sweep, apart from the swept lr.
    assert t["lr_metric"].iloc[0] == pytest.approx(1e-3) and "lr" not in df.columns[13:]
    s = df[df["run"] == "lr_sweep"]
    assert sorted(s["lr"].unique()) == [3e-4, 1e-3]
    row = s[(s["point"] == 1) & (s["seed"] == 1) & (s["update"] == 4)].iloc[0]
    assert row["episode_return"] == episode_return(4, 1, 1) and row["env_steps"] == 4 * 256
    assert row["eval_return"] == episode_return(4, 1, 1) + 1
    assert s["eval_return"].notna().sum() == 2 * 2  # final rows only
    # Wall time is prorated by update over the run (train) or the point's program (sweep).
    np.testing.assert_allclose(t[t["seed"] == 0]["wall_time_s"], 2.0 * np.arange(1, 9) / 8)
    np.testing.assert_allclose(s[(s["point"] == 1) & (s["seed"] == 0)]["wall_time_s"], 3.0 * np.arange(1, 5) / 4)


def test_load_parent_folder_and_name_clashes(folders, tmp_path):
    parent = analysis.load(tmp_path)
    assert sorted(parent["run"].unique()) == ["lr_sweep", "ppo_run"]
    other = write_train_run(tmp_path / "more" / "ppo_run", algo="trpo")
    df = analysis.load([folders[0], other, folders[0]])  # the repeated folder loads once
    assert sorted(df["run"].unique()) == sorted([str(folders[0]), str(other)])
    write_tune(tmp_path / "study")
    with pytest.warns(UserWarning, match="tune"):
        assert analysis.load(tmp_path)["run"].nunique() == 2


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "is not a kl-rl run or sweep folder (no metrics.csv)"),
        (lambda p: write_tune(p / "study"), "load_trials"),
        (lambda p: (p / "metrics.csv").write_text("a,b\n1,2\n") and p, "has no seed column"),
    ],
)
def test_load_bad_paths(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(ConfigError) as err:
        analysis.load(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_load_trials(tmp_path):
    trials = analysis.load_trials(write_tune(tmp_path / "study"))
    assert list(trials.columns[:5]) == ["run", "path", "algo", "env", "number"] and len(trials) == 2
    with pytest.raises(ConfigError, match="not a kl-rl tune folder"):
        analysis.load_trials(write_train_run(tmp_path / "run"))


def test_final_scores(folders):
    final = analysis.final_scores(analysis.load(folders))
    assert len(final) == 3 + 2 * 2
    assert {"run", "point", "lr", "clip_eps", "seed", "final_return"} <= set(final.columns)
    t = final[final["run"] == "ppo_run"].sort_values("seed")
    np.testing.assert_allclose(t["final_return"], [episode_return(8, s) + 1 for s in range(3)])
    assert (t["update"] == 8).all() and (t["wall_time_s"] == 2.0).all()


def test_score_matrix(tmp_path):
    for algo, offset in (("ppo", 0.0), ("trpo", 100.0)):
        for env in ("CartPole-v1", "Acrobot-v1"):
            write_train_run(tmp_path / f"{algo}-{env}", algo=algo, env=env, seeds=3, offset=offset)
    final = analysis.final_scores(analysis.load(tmp_path))
    scores = analysis.score_matrix(final, by="algo")
    assert list(scores) == ["ppo", "trpo"] and scores["ppo"].shape == (3, 2)
    # Columns are the envs sorted by name (Acrobot, CartPole); rows the seeds.
    np.testing.assert_allclose(scores["trpo"][:, 0], [episode_return(8, s, 0, 100.0) + 1 for s in range(3)])
    normalized = analysis.score_matrix(final, by="algo", normalize=True)
    low, high = zip(*(analysis.REFERENCE_SCORES[e] for e in ("Acrobot-v1", "CartPole-v1")), strict=True)
    np.testing.assert_allclose(normalized["ppo"], analysis.normalize(scores["ppo"], low, high))
    by_run = analysis.score_matrix(final[final["env"] == "Acrobot-v1"], by=["algo", "env"])
    assert list(by_run) == [("ppo", "Acrobot-v1"), ("trpo", "Acrobot-v1")]

    write_train_run(tmp_path / "ppo-more", algo="ppo", env="CartPole-v1", seeds=2)
    final = analysis.final_scores(analysis.load(tmp_path))
    with pytest.warns(UserWarning, match="keeping the first 3"):
        assert analysis.score_matrix(final)["ppo"].shape == (3, 2)
    with pytest.raises(ConfigError, match="has no runs on Pendulum-v1"):
        analysis.score_matrix(final, tasks=["Pendulum-v1"])
    final.loc[:, "env"] = "MyEnv-v0"
    with warnings.catch_warnings(), pytest.raises(ConfigError, match="no reference scores for MyEnv-v0"):
        analysis.score_matrix(final, normalize=True)


@pytest.mark.slow
def test_load_real_run_folder(tmp_path):
    import kl_rl

    result = kl_rl.run("ppo", "CartPole-v1", seeds=2, total_steps=1024, num_envs=4, num_steps=32)
    result.save(tmp_path / "run")
    df = analysis.load(tmp_path / "run")
    assert len(df) == 2 * result.config.num_updates
    assert {"kl", "entropy", "episode_return", "lr"} <= set(df.columns)
    final = analysis.final_scores(df).sort_values("seed")
    np.testing.assert_allclose(final["final_return"], result.final_returns, rtol=1e-6)
    assert df["wall_time_s"].max() == pytest.approx(result.wall_time_s)
