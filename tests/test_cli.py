"""The CLI: a run folder's contents, one-line errors with exit 2 that leave files alone, and its own layer."""

import ast
import csv
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kl_rl
from kl_rl.cli import main
from cli_checks import assert_one_line_error

PACKAGE = Path(kl_rl.__file__).parent
LIBRARY = sorted(
    ".".join(("kl_rl", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
    for p in PACKAGE.rglob("*.py")
    if p.relative_to(PACKAGE).parts[0] != "cli"
)
"""Every module of kl_rl outside kl_rl/cli."""

FAST = ["--total-steps", "2048", "--num-envs", "4", "--num-steps", "64", "--update-epochs", "1", "--no-progress"]


@pytest.fixture
def existing_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"keep": true}')
    return out


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--algo", "dqn"], ["unknown algo 'dqn'", "ppo"]),
        (["--env", "Pong-v9"], ["unknown env 'Pong-v9'", "CartPole-v1"]),
        (["--lerning-rate", "1e-3"], ["unknown hyperparameter"]),
        (["--total-steps", "0"], ["--total-steps", "positive"]),
        (["--total-steps", "-5"], ["--total-steps"]),
        (["--total-steps", "many"], ["--total-steps expects int", "'many'"]),
        (["--lr", "0"], ["--lr must be a positive number"]),
        (["--lr", "fast"], ["--lr expects float"]),
        (["--ent-coef", "inf"], ["--ent-coef must be a finite number, got inf"]),
        (["--lr=-Infinity"], ["--lr must be a finite number, got -Infinity"]),
        (["--clip-eps", "nan"], ["--clip-eps must be a finite number, got nan"]),
        (["--seeds", "0"], ["--seeds"]),
        (["--num-minibatches", "3"], ["does not divide", "256"]),
        (["--env", "Pendulum-v1", "--distribution", "categorical"], ["categorical", "discrete", "gaussian"]),
        (["--config", "/nonexistent/cfg.yaml"], ["cannot read config file"]),
        (["--clip-eps"], ["--clip-eps needs a value"]),
        (["--surrogate", "spo2"], ["unknown --surrogate 'spo2'", "clip, spo"]),
        (["--algo", "mdpo", "--step-size", "0"], ["--step-size must be a positive number"]),
        (["--algo", "vmpo", "--eps-alpha-sigma", "-1e-4"], ["--eps-alpha-sigma must be a positive number"]),
        (["--batching", "scan"], ["--batching must be one of map, vmap, got 'scan'"]),
        (["--env", "Acrobot-v1", "--env-path", "host", "--batching", "map"], ["--batching map does not apply"]),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_the_folder(capsys, existing_run, args, needles):
    code = main(["train", "--out", str(existing_run), *args])
    assert_one_line_error(capsys, code, *needles)
    assert [p.name for p in existing_run.iterdir()] == ["summary.json"]
    assert json.loads((existing_run / "summary.json").read_text()) == {"keep": True}


def test_malformed_config_file(capsys, tmp_path, existing_run):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    assert_one_line_error(capsys, main(["train", "--out", str(existing_run), "--config", str(bad)]), "not valid")
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("learning_rat = 3\n")
    assert_one_line_error(capsys, main(["train", "--config", str(wrong)]), "unknown hyperparameter")


def test_non_finite_values_from_a_file_or_a_grid_are_one_line_errors(capsys, tmp_path):
    infinite = tmp_path / "inf.yaml"
    infinite.write_text("ent_coef: .inf\n")
    code = main(["train", "--config", str(infinite)])
    assert_one_line_error(capsys, code, "--ent-coef must be a finite number, got inf")
    code = main(["sweep", "--grid", "lr=3e-4,nan", "--out", str(tmp_path / "sweep")])
    assert_one_line_error(capsys, code, "--lr must be a finite number, got nan")
    assert not (tmp_path / "sweep").exists()


def test_config_file_and_flags_set_fields(tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('lr = 0.0005\nhidden_sizes = [32, 32]\nactivation = "relu"\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--clip-eps=0.1", *FAST]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == 0.0005 and config["hidden_sizes"] == [32, 32] and config["activation"] == "relu"
    assert config["clip_eps"] == 0.1 and config["total_steps"] == 2048


def test_train_writes_the_run_folder(tmp_path, capsys, existing_run):
    assert main(["train", "--seeds", "2", "--out", str(existing_run), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "final_return" in printed and "median" in printed
    names = sorted(p.name for p in existing_run.iterdir())
    assert names == ["checkpoints", "config.json", "metrics.csv", "summary.json"]
    summary = json.loads((existing_run / "summary.json").read_text())
    keys = ("algo", "env", "seeds", "total_env_steps", "final_return")
    keys += ("wall_time_s", "compile_time_s", "env_steps_per_s", "kl_rl_version", "jax_version", "device")
    for key in keys:
        assert key in summary
    # The git commit of the working directory and of kl_rl's source, where they are git checkouts.
    for key in ("git_commit", "kl_rl_git_commit"):
        assert summary[key] is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", summary[key]), summary[key]
    source = Path(__file__).resolve().parents[1]
    if (source / ".git").exists():
        head = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        assert summary["kl_rl_git_commit"].startswith(head.stdout.strip())
    assert summary["seeds"] == [0, 1] and len(summary["final_return"]) == 2
    assert summary["diverged"] == [None, None] and summary["diverged_seeds"] == 0
    assert summary["total_env_steps"] == 2048
    assert summary["batching"] == "map" and json.loads((existing_run / "config.json").read_text())["batching"] == "map"
    assert re.search(r"env steps/s on \d+ device\(s\), map batching", printed), printed
    with open(existing_run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 8
    for col in ("seed", "env_steps", "episode_return", "kl", "entropy", "pg_loss", "vf_loss", "eval_return"):
        assert col in rows[0]
    last = [r for r in rows if r["update"] == "8"]
    assert [float(r["eval_return"]) for r in last] == pytest.approx(summary["final_return"])
    # kl-rl plot on the run folder, with no further arguments.
    capsys.readouterr()
    assert main(["plot", str(existing_run)]) == 0
    names = ["learning_curves", "learning_curves_wall_time", "kl_curves"]
    expected = sorted(f"{n}.{ext}" for n in names for ext in ("png", "svg"))
    assert sorted(p.name for p in (existing_run / "plots").iterdir()) == expected
    assert capsys.readouterr().out.count("\n") == len(expected)


class _Stop(Exception):
    """Raised by a stand-in for `pipeline.group` once it has its arguments, so nothing compiles."""


@pytest.mark.parametrize("command", ["train", "sweep", "tune"])
def test_batching_reaches_the_pipeline_from_every_command(tmp_path, monkeypatch, command):
    from kl_rl import pipeline

    seen = []

    def group(*args, batching=None, **kwargs):
        seen.append(batching)
        raise _Stop

    monkeypatch.setattr(pipeline, "group", group)
    extra = {
        "train": [],
        "sweep": ["--grid", "lr=1e-3,3e-4"],
        "tune": ["--space", "lr=1e-4:1e-3", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--trials", "1"],
    }[command]
    if command == "tune":
        pytest.importorskip("optuna")
    for batching in ("vmap", "map"):
        with pytest.raises(_Stop):
            main([command, "--batching", batching, "--out", str(tmp_path / "out"), *extra, *FAST])
    with pytest.raises(_Stop):
        main([command, "--out", str(tmp_path / "out"), *extra, *FAST])
    assert seen == ["vmap", "map", None]  # None: the platform's default, chosen by parallel.layout


def test_console_script_help_lists_hyperparameters():
    proc = subprocess.run(
        [sys.executable, "-m", "kl_rl.cli", "train", "--help"], capture_output=True, text=True, check=False, timeout=120
    )
    assert proc.returncode == 0
    assert "--clip-eps" in proc.stdout and "traced" in proc.stdout and "static" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "kl_rl.cli", "train", "--algo", "nope"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_progress_reports_env_steps_and_the_bar_runs(tmp_path, capsys):
    import kl_rl

    seen = []
    result = kl_rl.run(
        "ppo", "CartPole-v1", seeds=2, progress=lambda done, total: seen.append((done, total)),
        total_steps=2048, num_envs=4, num_steps=64, update_epochs=1,
    )  # fmt: skip
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[0] == 0 and done[-1] == 2 * result.total_env_steps
    assert {t for _, t in seen} == {2 * result.total_env_steps}
    assert all(isinstance(n, int) for n in done)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *[a for a in FAST if a != "--no-progress"]]) == 0
    assert "step" in capsys.readouterr().err  # tqdm writes the bar to stderr


@pytest.mark.parametrize(
    "algo, args, columns",
    [
        ("vpg", ["--total-steps", "1024", "--num-envs", "4", "--num-steps", "128", "--vf-epochs", "1"], ["pg_loss"]),
        (
            "trpo",
            ["--total-steps", "1024", "--num-envs", "4", "--num-steps", "128", "--vf-epochs", "1"],
            ["line_search_steps", "accepted", "cg_residual"],
        ),
        ("cem", ["--iterations", "3", "--population-size", "8"], ["fitness_mean", "fitness_elite", "fitness_best"]),
    ],
)
def test_every_algo_writes_the_same_run_folder(tmp_path, capsys, algo, args, columns):
    out = tmp_path / algo
    assert main(["train", "--algo", algo, "--seeds", "2", "--out", str(out), "--no-progress", *args]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "metrics.csv", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algo"] == algo and len(summary["final_return"]) == 2
    assert summary["diverged"] == [None, None]
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for col in ("seed", "env_steps", "episode_return", "kl", "entropy", "eval_return", *columns):
        assert col in rows[0], col


def test_a_diverging_run_writes_its_folder_then_says_where_in_one_line_with_exit_3(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--env", "Pendulum-v1", "--lr", "1e6", "--max-grad-norm", "1e9", "--seeds", "2", "--out", str(out)]
    assert main(["train", *args, *FAST]) == 3
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.err.count("\n") == 1, captured.err
    match = re.fullmatch(
        r"kl-rl: error: seed 0 diverged at update (\d+) of 8 \(non-finite values\); (\d) of 2 seed\(s\) diverged; "
        r"metrics up to that point are in (.+)\n",
        captured.err,
    )
    assert match and match[3] == str(out), captured.err
    assert "diverged at update" in captured.out and "nan" not in captured.out
    summary = json.loads((out / "summary.json").read_text())
    diverged = summary["diverged"]
    assert diverged[0] == int(match[1]) and int(match[2]) == summary["diverged_seeds"] == 2
    assert all(isinstance(u, int) and 1 <= u <= 8 for u in diverged)
    assert summary["final_return"] == [None, None] and summary["final_return_iqm"] is None
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for seed, update in enumerate(diverged):
        mine = [r for r in rows if r["seed"] == str(seed)]
        # Rows up to and including the first bad update, which says so; no evaluation.
        assert [int(r["update"]) for r in mine] == list(range(1, update + 1))
        assert [float(r["nonfinite"]) for r in mine] == [0.0] * (update - 1) + [1.0]
        assert all(r["eval_return"] == "" for r in mine)


def test_total_steps_on_an_iteration_counted_algo_is_a_one_line_error(capsys):
    code = main(["train", "--algo", "cem", "--total-steps", "1000"])
    assert_one_line_error(capsys, code, "--total-steps does not apply to cem", "--iterations")


def _is_cli(name: str) -> bool:
    return name == "kl_rl.cli" or name.startswith("kl_rl.cli.")


def test_library_modules_import_nothing_from_the_cli():
    """No module outside kl_rl/cli names kl_rl.cli in an import, at the top or inside a function."""
    assert "kl_rl.runner" in LIBRARY and "kl_rl.envs" in LIBRARY and not any(map(_is_cli, LIBRARY))
    found = []
    for module in LIBRARY:
        path = PACKAGE.joinpath(*module.split(".")[1:])
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                names = [source, *(f"{source}.{alias.name}" for alias in node.names)]
            else:
                continue
            found += [f"{module}:{node.lineno} imports {name}" for name in names if _is_cli(name)]
    assert not found


def test_importing_the_library_loads_no_cli_module():
    code = (
        "import importlib, sys\n"
        f"for name in {LIBRARY!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'kl_rl.cli' or m.startswith('kl_rl.cli.')))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True, check=False, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
