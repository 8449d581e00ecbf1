"""Sweeps: grid parsing, one program per static group, results equal to separate runs."""

import json

import numpy as np
import pytest

import kl_rl
from kl_rl import sweep
from kl_rl.cli import main
from kl_rl.errors import ConfigError


def test_parse_grid_types_values_and_tuples():
    grid = sweep.parse_grid("ppo", ["lr=3e-4,1e-3", "clip-eps=0.1", "hidden_sizes=64:64,32"])
    assert grid == {"lr": [3e-4, 1e-3], "clip_eps": [0.1], "hidden_sizes": [(64, 64), (32,)]}
    assert len(sweep.expand(grid)) == 4


@pytest.mark.parametrize(
    "items, needle",
    [
        (["lr"], "malformed grid item"),
        (["lr=1e-3,"], "malformed grid item"),
        (["lerning_rate=1e-3"], "unknown hyperparameter"),
        (["lr=fast"], "^lr expects float"),
        (["lr=1e-3", "lr=3e-4"], "twice"),
        (["total_steps=1000,2000"], "cannot vary total_steps"),
    ],
)
def test_bad_grids_are_config_errors(items, needle):
    with pytest.raises(ConfigError, match=needle):
        sweep.parse_grid("ppo", items)


def test_traced_grid_is_one_program_and_each_point_is_the_run_of_its_config_and_seed():
    # Two traced fields in one program; each value of each is checked against a separate run,
    # bit for bit (on CPU a point's result depends only on its config and seed). gamma with
    # reward normalization: the collector used to read gamma from the trainer's own config, so
    # every point of a sweep over gamma got the first point's. 60 updates of a few env steps.
    small = dict(num_envs=2, num_steps=16, total_steps=2 * 16 * 60, num_minibatches=2, update_epochs=2,
                 normalize_reward=True)  # fmt: skip
    grid = {"lr": [3e-4, 1e-2], "gamma": [0.9, 0.99], "clip_eps": [0.2]}
    result = sweep.run_sweep("ppo", "CartPole-v1", grid, seeds=2, overrides=small)
    assert len(result.programs) == 1
    assert result.metrics["kl"].shape == (4, 2, 60)
    index = {(p["lr"], p["gamma"]): i for i, p in enumerate(result.points)}
    # The last point, whose lr and gamma both differ from the first point's (3e-4, 0.9): a field
    # that took the first point's value (or either point's) gives other bits.
    p = index[1e-2, 0.99]
    alone = kl_rl.run("ppo", "CartPole-v1", seeds=2, **{**small, "lr": 1e-2, "gamma": 0.99, "clip_eps": 0.2})
    for name in ("kl", "pg_loss", "vf_loss", "episode_return"):
        np.testing.assert_array_equal(result.metrics[name][p], alone.metrics[name], err_msg=name)
    np.testing.assert_array_equal(result.final_returns[p], alone.final_returns)
    # The two learning rates and the two discounts really differ in effect.
    first = index[3e-4, 0.9]
    assert not np.allclose(result.metrics["kl"][first], result.metrics["kl"][index[1e-2, 0.9]])
    assert not np.array_equal(result.metrics["vf_loss"][first], result.metrics["vf_loss"][index[3e-4, 0.99]])


def test_static_values_make_separate_programs_and_chunks_reuse_one():
    result = sweep.run_sweep(
        "ppo", "CartPole-v1", {"num_steps": [32, 64], "lr": [1e-3, 3e-4, 1e-4]}, seeds=1,
        overrides=dict(total_steps=512, num_envs=4, update_epochs=1), chunk_size=2,
    )  # fmt: skip
    assert len(result.programs) == 2
    assert [len(p["points"]) for p in result.programs] == [3, 3]
    assert result.final_returns.shape == (6, 1)
    ranking = result.ranking()
    assert [r["final_return_iqm"] for r in ranking] == sorted((r["final_return_iqm"] for r in ranking), reverse=True)
    lo, hi = ranking[0]["iqm_ci95"]
    assert lo <= ranking[0]["final_return_iqm"] <= hi


def test_cli_sweep_writes_a_tidy_table_and_ranking(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--grid", "lr=3e-4,1e-3", "--seeds", "2", "--out", str(out), "--total-steps", "1024"]
    assert main([*args, "--num-envs", "4", "--num-steps", "64", "--update-epochs", "1"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "compiled 1 program(s) for 2 grid point(s)" in printed
    # The progress bar counts every grid point's and seed's env steps: 2 x 2 x 1024.
    assert "4.10k/4.10k" in captured.err
    lines = (out / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert header[:4] == ["point", "lr", "seed", "update"] and "lr_metric" in header
    assert len(lines) == 1 + 2 * 2 * 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compiled_programs"] == 1 and len(summary["ranking"]) == 2
    assert summary["batching"] == json.loads((out / "config.json").read_text())["batching"] == "map"
    # kl-rl plot on the sweep folder, with no further arguments.
    assert main(["plot", str(out)]) == 0
    names = ["learning_curves", "learning_curves_wall_time", "kl_curves", "return_kl_tradeoff_lr"]
    expected = sorted(f"{n}.{ext}" for n in names for ext in ("png", "svg"))
    assert sorted(p.name for p in (out / "plots").iterdir()) == expected
    assert all((out / "plots" / name).stat().st_size > 1000 for name in expected)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--grid", "lr"], "malformed --grid item"),
        (["--grid", "nope=1"], "unknown hyperparameter"),
        (["--grid", "num_envs=4.5"], "--num-envs expects int"),
        ([], "--grid needs at least one"),
        (["--algo", "cem", "--grid", "elite_frac=0.1", "--total-steps", "1000"], "--total-steps does not apply to cem"),
        (["--grid", "lr=1e-3", "--batching", "pmap"], "--batching must be one of map, vmap, got 'pmap'"),
    ],
)
def test_cli_sweep_bad_input_is_one_line(tmp_path, capsys, args, needle):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    assert main(["sweep", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert (out / "summary.json").read_text() == "{}"


SMALL_PPO = dict(total_steps=1024, num_envs=4, num_steps=64, update_epochs=2)
SHARD = dict(grid={"lr": [3e-4, 3e-3, 1e-2]}, seeds=2, overrides=SMALL_PPO)
SHARD_SCRIPT = f"""
import json, sys
from kl_rl import sweep
import jax
r = sweep.run_sweep("ppo", "CartPole-v1", **{SHARD!r})
print(json.dumps({{"devices": len(jax.devices()), "final": r.final_returns.tolist(), "kl": r.metrics["kl"].tolist()}}))
"""


def test_four_forced_host_devices_give_the_results_of_one(tmp_path):
    import os
    import subprocess
    import sys

    import jax

    # Four devices in a fresh process (the count is fixed when JAX starts), with conftest's compile
    # flags; one device here, in this process.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    env = {**os.environ, "XLA_FLAGS": flags.strip()}
    out = subprocess.run([sys.executable, "-c", SHARD_SCRIPT], env=env, capture_output=True, text=True, check=True)
    four = json.loads(out.stdout.strip().splitlines()[-1])
    assert four["devices"] == 4 and len(jax.devices()) == 1
    one = sweep.run_sweep("ppo", "CartPole-v1", **SHARD)
    # 3 grid points over 4 devices: padded to 4, the pad dropped.
    np.testing.assert_array_equal(four["final"], one.final_returns)
    np.testing.assert_allclose(four["kl"], one.metrics["kl"], rtol=2e-3, atol=1e-8)


def test_cem_elite_fraction_is_traced_so_its_sweep_is_one_program():
    result = sweep.run_sweep("cem", "CartPole-v1", {"elite_frac": [0.1, 0.5]}, seeds=1, overrides=dict(iterations=3))
    assert len(result.programs) == 1
    elite = result.metrics["fitness_elite"][:, 0, 0]
    assert elite[0] >= elite[1]  # the mean fitness of the top 10% is at least that of the top 50%
    assert not np.array_equal(result.metrics["kl"][0], result.metrics["kl"][1])
