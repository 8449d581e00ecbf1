"""`kl-rl eval` and `kl-rl compare`: re-evaluation reproduces training's final evaluation exactly,
its options change what they should, bad input is one line that writes nothing; the comparison
table's numbers are kl_rl.analysis's."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import kl_rl
from cli_checks import assert_one_line_error
from fake_runs import write_train_run
from kl_rl.cli import main

# The module-scoped run is trained once: the whole file runs on one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("test_cli_eval")

# 4 updates of 4 envs x 32 steps, checkpoints at updates 2 and 4, 4 evaluation episodes.
TINY = ["--total-steps", "512", "--num-envs", "4", "--num-steps", "32", "--update-epochs", "1",
        "--num-minibatches", "1", "--hidden-sizes", "16", "--eval-episodes", "4", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "ppo-cartpole"
    args = ["train", "--algo", "ppo", "--env", "CartPole-v1", "--seeds", "3", "--checkpoint-every", "2"]
    assert main([*args, *TINY, "--out", str(out)]) == 0
    return out


def _training_files(run_dir: Path) -> dict[str, str]:
    """sha256 of every file in the run folder outside eval/."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.relative_to(run_dir).parts[0] != "eval"
    }


def _eval(run_dir: Path, capsys, *args: str) -> dict:
    """Runs kl-rl eval, returns the JSON file it names on its last line."""
    capsys.readouterr()
    assert main(["eval", str(run_dir), *args]) == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert last.startswith("eval file: ")
    return json.loads(Path(last.removeprefix("eval file: ")).read_text())


def test_eval_reproduces_trainings_final_evaluation_exactly_and_touches_no_training_file(run_dir, capsys):
    before = _training_files(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    record = _eval(run_dir, capsys)
    # Same keys, same episode count, same compiled evaluation: the same bits, not close ones.
    assert record["return"] == summary["final_return"]
    assert record["return_iqm"] == summary["final_return_iqm"]
    assert record["return_median"] == summary["final_return_median"]
    assert (record["update"], record["episodes"], record["stochastic"], record["keys"]) == (4, 4, False, "training")
    assert np.array(record["returns"]).shape == (3, 4)
    assert (run_dir / "eval" / "update4-4ep-mode.json").is_file()
    assert _training_files(run_dir) == before
    assert [p.name for p in (run_dir / "eval").iterdir()] == ["update4-4ep-mode.json"]  # no temporary left


def test_eval_options_change_what_they_name(run_dir, capsys):
    base = json.loads((run_dir / "summary.json").read_text())["final_return"]  # what eval gives, exactly (above)
    heavy = _eval(run_dir, capsys, "--env.masspole", "0.5")
    assert heavy["env_params"] == {"masspole": 0.5} and heavy["env_param_overrides"] == {"masspole": 0.5}
    assert heavy["return"] != base
    # One seed of the three: the bits that seed had among all (on CPU a seed's bits are its own).
    one = _eval(run_dir, capsys, "--seeds", "1", "--name", "seed1")
    assert one["seeds"] == [1] and one["return"] == [base[1]]
    assert (run_dir / "eval" / "seed1.json").is_file()
    sampled = _eval(run_dir, capsys, "--stochastic", "--episodes", "6", "--update", "2")
    assert (sampled["stochastic"], sampled["episodes"], sampled["update"]) == (True, 6, 2)
    assert np.array(sampled["returns"]).shape == (3, 6)
    # From Python: kl_rl.load is the loader, evaluate takes the same options.
    loaded = kl_rl.load(run_dir, update=2)
    assert int(loaded.state.update_count[0]) == 2
    returns = loaded.evaluate(episodes=6, stochastic=True)
    np.testing.assert_array_equal(returns, np.array(sampled["returns"], np.float32))


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--env.massplole", "0.5"], ["CartPole-v1 has no env param 'massplole'", "masspole"]),
        (["--env.masspole", "heavy"], ["--env.masspole expects float"]),
        (["--update", "3"], ["no checkpoint at --update 3", "it holds updates 2, 4"]),
        (["--update", "two"], ["--update expects int"]),
        (["--seeds", "5"], ["--seeds: seed 5 is not one of the run's seeds 0, 1, 2"]),
        (["--seeds", "0,,1"], ["--seeds takes the run's seed ids"]),
        (["--seeds", "1,1"], ["--seeds names a seed twice"]),
        (["--episodes", "0"], ["--episodes must be a positive integer"]),
        (["--name", "../x"], ["--name '../x' is not a plain file name"]),
        (["--lr", "1e-3"], ["unknown option --lr for kl-rl eval"]),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(run_dir, capsys, tmp_path, args, needles):
    # A copy, so that the good calls of the other tests (its eval/ folder) do not hide a write.
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval"))
    before = _training_files(run)
    capsys.readouterr()
    assert_one_line_error(capsys, main(["eval", str(run), *args]), *needles)
    assert not (run / "eval").exists()
    assert _training_files(run) == before


def test_eval_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert_one_line_error(capsys, main(["eval", str(tmp_path / "missing")]), "does not exist")
    (tmp_path / "notes").mkdir()
    assert_one_line_error(capsys, main(["eval", str(tmp_path / "notes")]), "config.json is missing")
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "config.json").write_text(json.dumps({"algo": "ppo", "env": "CartPole-v1", "seeds": 2, "grid": {}}))
    assert_one_line_error(capsys, main(["eval", str(sweep)]), "not a kl-rl train run folder")
    assert_one_line_error(capsys, main(["eval"]), "needs a run folder")
    assert not any((tmp_path / d / "eval").exists() for d in ("notes", "sweep"))


def test_compare_prints_analysis_numbers_and_a_symmetric_probability_of_improvement(tmp_path, capsys):
    from kl_rl import analysis

    ppo = write_train_run(tmp_path / "ppo", "ppo", seeds=5)
    trpo = write_train_run(tmp_path / "trpo", "trpo", seeds=4, offset=3.0)
    assert main(["compare", str(ppo), str(trpo), "--reps", "500"]) == 0
    out = capsys.readouterr().out
    final = analysis.final_scores(analysis.load([ppo, trpo]))
    table = analysis.compare(final, reps=500)
    for algo in ("ppo", "trpo"):
        scores = final.loc[final["algo"] == algo, "final_return"].to_numpy()
        want = analysis.interval(scores, "iqm", reps=500)
        cell = table.cells.set_index("group").loc[algo]
        assert (cell["iqm"], cell["low"], cell["high"]) == tuple(want)
        assert f"{want.estimate:.2f} [{want.low:.2f}, {want.high:.2f}] n={len(scores)}" in out
    # fake_runs' closed form: final = 10 * 8 + 2 * seed + 1 (+ 3 for trpo).
    np.testing.assert_array_equal(final.loc[final["algo"] == "ppo", "final_return"], [81, 83, 85, 87, 89])
    pairs = table.pairs.set_index(["x", "y"])
    p_xy, p_yx = pairs.loc[("ppo", "trpo"), "p"], pairs.loc[("trpo", "ppo"), "p"]
    x = final.loc[final["algo"] == "ppo", "final_return"].to_numpy()[:, None]
    y = final.loc[final["algo"] == "trpo", "final_return"].to_numpy()[:, None]
    assert p_xy == analysis.probability_of_improvement(x, y, reps=500).estimate
    # By hand: ppo {81..89 step 2} vs trpo {84..90 step 2}: 6 of 20 pairs won, no tie.
    assert p_xy == pytest.approx(6 / 20)
    assert 0.0 <= p_xy <= 1.0 and p_xy + p_yx == pytest.approx(1.0)
    for row in table.pairs.itertuples():
        assert 0.0 <= row.low <= row.p <= row.high <= 1.0
    assert f"{p_xy:.2f} [" in out and f"{p_yx:.2f} [" in out


def test_compare_ties_count_half_each_way(tmp_path):
    from kl_rl import analysis

    a = write_train_run(tmp_path / "a", "ppo", seeds=3)
    b = write_train_run(tmp_path / "b", "vpg", seeds=3)  # the same returns: every pair is a tie or a mirror
    table = analysis.compare(analysis.final_scores(analysis.load([a, b])), reps=50)
    assert list(table.pairs["p"]) == [0.5, 0.5]


def test_compare_bad_input_is_one_line(tmp_path, capsys):
    from fake_runs import write_sweep

    run = write_train_run(tmp_path / "ppo", "ppo")
    sweep = write_sweep(tmp_path / "sweep")
    assert_one_line_error(capsys, main(["compare", str(run), str(sweep)]), "sweep is a sweep folder")
    assert_one_line_error(capsys, main(["compare"]), "at least one run folder")
    assert_one_line_error(capsys, main(["compare", str(tmp_path / "none")]), "does not exist")
    assert_one_line_error(capsys, main(["compare", str(run), "--reps", "0"]), "--reps must be a positive")


def test_compare_reads_an_evaluation_instead_of_the_final_returns(tmp_path, capsys):
    from kl_rl import analysis
    from kl_rl.runfolder import Evaluation

    ppo = write_train_run(tmp_path / "ppo", "ppo", seeds=4)
    trpo = write_train_run(tmp_path / "trpo", "trpo", seeds=4)
    heavy = {ppo: [[10.0, 12.0], [20.0, 22.0], [30.0, 32.0], [40.0, 42.0]], trpo: [[5.0, 5.0], [25.0, 25.0]]}
    for folder, returns in heavy.items():
        seeds = list(range(len(returns)))  # trpo's evaluation: seeds 0 and 1 only
        Evaluation(folder, "x", "CartPole-v1", 8, 8, seeds, np.array(returns), False, {"masspole": 0.5},
                   {"masspole": 0.5}, "training", subset=folder == trpo).save("heavy")  # fmt: skip
    assert main(["compare", str(ppo), str(trpo), "--eval", "heavy", "--reps", "200"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("IQM of returns of eval/heavy.json")
    want = analysis.interval(np.array([11.0, 21.0, 31.0, 41.0]), "iqm", reps=200)
    assert want.estimate == 26.0 and f"{want.estimate:.2f} [{want.low:.2f}, {want.high:.2f}] n=4" in out
    trpo_row = out.splitlines()[3]
    assert trpo_row.startswith("trpo") and "15.00 [" in trpo_row and "n=2" in trpo_row  # its two evaluated seeds
    # ppo {11, 21, 31, 41} against trpo {5, 25}: 6 of 8 pairs won.
    assert "0.75 [" in out and "0.25 [" in out
    (trpo / "eval" / "heavy.json").unlink()
    assert_one_line_error(capsys, main(["compare", str(ppo), str(trpo), "--eval", "heavy"]), "has no eval/heavy.json")
