import numpy as np
import pytest
from fake_runs import write_sweep, write_train_run

from kl_rl import analysis, plots
from kl_rl.cli import plot as plot_cli
from kl_rl.errors import ConfigError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_two_algos(folder, envs=("CartPole-v1", "Acrobot-v1")):
    """ppo and trpo runs on `envs`: a folder of run folders."""
    for algo, offset in (("ppo", 0.0), ("trpo", 50.0)):
        for env in envs:
            write_train_run(folder / f"{algo}-{env}", algo=algo, env=env, offset=offset)
    return folder


@pytest.fixture
def two_algos(tmp_path):
    return write_two_algos(tmp_path / "runs")


@pytest.fixture
def sweep(tmp_path):
    return write_sweep(tmp_path / "sweep", grid={"kl_coef": [1.0, 0.01, 0.1]}, run_times=[2.0, 3.0, 5.0])


def _legend_texts(fig):
    return [t.get_text() for t in fig.legends[0].get_texts()]


def test_learning_curves(two_algos):
    df = analysis.load(two_algos)
    fig = plots.learning_curves(df)
    assert len(fig.axes) == 2  # one panel per env
    assert [ax.get_title() for ax in fig.axes] == ["Acrobot-v1", "CartPole-v1"]
    for ax in fig.axes:
        assert [line.get_label() for line in ax.get_lines()] == ["ppo", "trpo"]
        assert len(ax.collections) == 2  # the bootstrap bands
        assert ax.get_xlabel() == "env steps"
    assert _legend_texts(fig) == ["ppo", "trpo"]
    # The line is the mean over seeds of 10 u + 2 seed (+ 50 for trpo): 10 u + 2.
    ppo = fig.axes[0].get_lines()[0]
    np.testing.assert_allclose(ppo.get_xdata(), 256 * np.arange(1, 9))
    np.testing.assert_allclose(ppo.get_ydata(), 10 * np.arange(1, 9) + 2)
    no_band = plots.learning_curves(df, col=None, ci=None, estimator="iqm")
    assert len(no_band.axes) == 1 and len(no_band.axes[0].collections) == 0


def test_learning_curves_interpolate_differing_x(sweep):
    df = analysis.load(sweep)
    # Each grid point ran in its own program: the points' wall-time grids differ.
    fig = plots.learning_curves(df, x="wall_time_s", hue="run", num_points=50)
    (line,) = fig.axes[0].get_lines()
    x = line.get_xdata()
    assert len(x) == 50 and x[0] == pytest.approx(5.0 / 8) and x[-1] == pytest.approx(2.0)  # the common range
    assert fig.axes[0].get_xlabel().startswith("wall time (s")
    by_config = plots.learning_curves(df, hue="kl_coef")
    assert _legend_texts(by_config) == ["kl_coef=0.01", "kl_coef=0.1", "kl_coef=1"]


def test_kl_curves(two_algos):
    fig = plots.kl_curves(analysis.load(two_algos))
    assert len(fig.axes) == 4  # return and KL rows x two envs
    returns, kls = fig.axes[:2], fig.axes[2:]
    for ax in fig.axes:
        assert len(ax.get_lines()) == 2
    assert all(ax.get_yscale() == "linear" for ax in returns) and all(ax.get_yscale() == "log" for ax in kls)
    assert "KL" in kls[0].get_ylabel()


def test_return_kl_tradeoff(sweep, tmp_path):
    df = analysis.load(sweep)
    fig = plots.return_kl_tradeoff(df, "kl_coef")
    (ax,) = fig.axes
    assert len(ax.containers) == 1  # one errorbar series: the sweep
    assert [t.get_text() for t in ax.texts] == ["0.01", "0.1", "1"]  # sorted by the parameter
    x, y = ax.get_lines()[0].get_data()
    # Point p: KL 0.01 (p + 1) (1 + 0.1 seed), mean over seeds 0..2 -> 0.011 (p + 1); kl_coef 1, 0.01, 0.1
    # are points 0, 1, 2. Final return 10 * 8 + 2 seed + 5 p + 1, IQM over 3 seeds = the middle seed's.
    np.testing.assert_allclose(x, [0.022, 0.033, 0.011])
    np.testing.assert_allclose(y, [81 + 2 + 5, 81 + 2 + 10, 81 + 2])
    assert ax.get_xscale() == "log"
    two = analysis.load(write_sweep(tmp_path / "two", grid={"kl_coef": [0.01, 0.1], "clip_eps": [0.1, 0.2]}))
    (ax,) = plots.return_kl_tradeoff(two, "kl_coef").axes
    # One series per value of the other swept hyperparameter, each through its two kl_coef points.
    assert len(ax.containers) == 2 and [len(c.lines[0].get_xdata()) for c in ax.containers] == [2, 2]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["two, clip_eps=0.1", "two, clip_eps=0.2"]
    with pytest.raises(ConfigError, match="no loaded sweep varies"):
        plots.return_kl_tradeoff(df.assign(kl_coef=np.nan), "kl_coef")


def test_interval_estimates_and_profile_plots():
    rng = np.random.default_rng(0)
    scores = {name: rng.uniform(size=(5, 3)) for name in ("ppo", "trpo", "vpg")}
    estimates = analysis.interval_estimates(scores, reps=200)
    fig = plots.interval_estimates_plot(estimates)
    assert [ax.get_title() for ax in fig.axes] == ["Mean", "Median", "IQM", "Optimality gap"]
    for ax in fig.axes:
        assert len(ax.patches) == 3  # one bar per algorithm
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["ppo", "trpo", "vpg"]
    bar = fig.axes[2].patches[1]  # trpo's IQM interval
    row = estimates[(estimates["algo"] == "trpo") & (estimates["metric"] == "iqm")].iloc[0]
    assert bar.get_x() == pytest.approx(row["low"]) and bar.get_width() == pytest.approx(row["high"] - row["low"])

    taus = np.linspace(0, 1, 21)
    profiles = {name: analysis.performance_profile(s, taus, reps=200) for name, s in scores.items()}
    fig = plots.performance_profile_plot(profiles)
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.get_lines()] == ["ppo", "trpo", "vpg"]
    assert len(ax.collections) == 3 and "runs" in ax.get_ylabel()


def _check_files(folder, names):
    for name in names:
        png, svg = folder / f"{name}.png", folder / f"{name}.svg"
        assert png.read_bytes()[:8] == PNG_SIGNATURE, name
        head = svg.read_text()[:100].lstrip()
        assert head.startswith("<?xml") or head.startswith("<svg"), name
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_save(tmp_path):
    fig = plots.performance_profile_plot({"a": analysis.performance_profile(np.ones((2, 2)), [0.5], reps=10)})
    written = plots.save(fig, tmp_path / "out" / "lr=0.001")  # a dotted name keeps its dot
    assert [p.name for p in written] == ["lr=0.001.png", "lr=0.001.svg"]
    _check_files(tmp_path / "out", ["lr=0.001"])


def test_cli_train_folder(tmp_path, capsys):
    run = write_train_run(tmp_path / "run")
    assert plot_cli.main([str(run)]) == 0
    names = ["learning_curves", "learning_curves_wall_time", "kl_curves"]
    _check_files(run / "plots", names)
    files = [f"{n}.{suffix}" for n in names for suffix in ("png", "svg")]
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(files)
    assert capsys.readouterr().out.split() == [str(run / "plots" / f) for f in files]


def test_cli_sweep_folder(sweep):
    assert plot_cli.main([str(sweep)]) == 0
    names = ["learning_curves", "learning_curves_wall_time", "kl_curves", "return_kl_tradeoff_kl_coef"]
    _check_files(sweep / "plots", names)
    # With the sweep alone, learning_curves is already one line per grid point.
    assert not (sweep / "plots" / "learning_curves_by_config.png").exists()


def test_cli_several_algorithms(sweep, tmp_path):
    runs = write_two_algos(tmp_path / "runs", envs=["CartPole-v1"])  # one env: fewer panels to render
    out = tmp_path / "figures"
    assert plot_cli.main([str(runs), str(sweep), "--out", str(out)]) == 0
    _check_files(out, ["learning_curves", "kl_curves", "learning_curves_by_config", "interval_estimates",
                       "performance_profile", "return_kl_tradeoff_kl_coef"])  # fmt: skip


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "needs at least one run or sweep folder"),
        (["{tmp}/missing"], "does not exist"),
        (["{tmp}"], "is not a kl-rl run or sweep folder"),
        (["{tmp}", "--bogus"], "unrecognized arguments"),
    ],
)
def test_cli_bad_input(tmp_path, argv, message):
    with pytest.raises(ConfigError) as err:
        plot_cli.main([a.format(tmp=tmp_path) for a in argv])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "plots").exists()


def test_cli_help(capsys):
    assert plot_cli.main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: kl-rl plot")


def test_figures_of_algorithms_sharing_no_env_say_so(tmp_path):
    write_train_run(tmp_path / "runs" / "ppo", algo="ppo", env="CartPole-v1")
    write_train_run(tmp_path / "runs" / "trpo", algo="trpo", env="Acrobot-v1")
    lines = []
    names = [name for name, _ in plots.figures(analysis.load([tmp_path / "runs"]), log=lines.append)]
    assert names == ["learning_curves", "learning_curves_wall_time", "kl_curves"]
    assert lines == ["no env is shared by all algorithms: no interval estimates or performance profiles"]
