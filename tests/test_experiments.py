"""The benchmark scripts' own arithmetic (the benchmarks themselves run outside the test suite)."""

import dataclasses
import importlib.util
import types
from pathlib import Path

import numpy as np
import pytest

ANCHOR = Path(__file__).parent.parent / "experiments" / "anchors" / "purejaxrl_ppo.py"


@pytest.fixture(scope="module")
def anchor():
    spec = importlib.util.spec_from_file_location("purejaxrl_ppo", ANCHOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_summary_divides_each_pair_and_bounds_the_median(anchor):
    out = types.SimpleNamespace(eval_returns=np.array([[500.0, 500.0], [400.0, 420.0], [10.0, 30.0]]))
    # PureJaxRL's times first. kl_rl does 1000 steps and PureJaxRL 1200, so equal times are a
    # ratio of 1000/1200, and kl_rl in half PureJaxRL's time twice that.
    summary = anchor.paired_summary([2.0, 1.0, 4.0], [1.0, 1.0, 4.0], 3.0, 1000, out, 1200)
    assert summary["paired_ratios"] == [round(2 * 1000 / 1200, 3), round(1000 / 1200, 3), round(1000 / 1200, 3)]
    assert summary["kl_rl_over_purejaxrl_median"] == round(1000 / 1200, 3)
    low, high = summary["ci95"]
    assert round(1000 / 1200, 3) <= low <= high <= round(2 * 1000 / 1200, 3)
    assert summary["env_steps_per_s"] == 1000  # the median of 1000, 1000 and 250 steps/s
    assert summary["final_return_median"] == 410.0  # per-seed means 500, 410, 20


def test_paired_summary_refuses_unpaired_times(anchor):
    out = types.SimpleNamespace(eval_returns=np.zeros((1, 2)))
    with pytest.raises(ValueError):
        anchor.paired_summary([1.0, 2.0], [1.0], 0.0, 10, out, 10)


def test_median_ci_of_paired_ratios_bounds_the_median(anchor):
    # How --kl-rl-batching map,vmap reports vmap over map: map's time over vmap's, pair by pair.
    out = anchor._median_ci([2.0 / 1.0, 3.0 / 2.0, 1.2 / 1.0])
    assert out["paired_ratios"] == [2.0, 1.5, 1.2] and out["median"] == 1.5
    assert 1.2 <= out["ci95"][0] <= 1.5 <= out["ci95"][1] <= 2.0


def _module(name: str):
    path = Path(__file__).parent.parent / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_end_to_end_summary_divides_sb3_by_each_kl_rl_median():
    summary = _module("end_to_end").summarize({"kl_rl_cold": [10.0, 14.0, 12.0], "kl_rl_warm": [4.0, 5.0, 6.0],
                                              "sb3": [40.0, 50.0, 30.0]})  # fmt: skip
    assert summary["median_wall_s"] == {"kl_rl_cold": 12.0, "kl_rl_warm": 5.0, "sb3": 40.0}
    assert summary["sb3_over_kl_rl_warm"] == 8.0
    assert round(summary["sb3_over_kl_rl_cold"], 3) == round(40.0 / 12.0, 3)


def test_compile_time_summary_is_kl_rl_over_purejaxrl():
    summary = _module("compile_time").summarize({"kl_rl": [5.0, 7.0, 6.0], "purejaxrl": [4.0, 8.0]})
    assert summary["median_compile_s"] == {"kl_rl": 6.0, "purejaxrl": 6.0}
    assert summary["kl_rl_over_purejaxrl"] == 1.0


def test_warm_compile_table_pairs_each_warm_compile_with_persistents_of_its_repetition(capsys):
    def row(mode, rep, temperature, compile_s, digest="a"):
        return {"mode": mode, "rep": rep, "temperature": temperature, "command": "train", "rc": 0,
                "compile_s": compile_s, "wall_s": compile_s + 10, "digest": digest}  # fmt: skip

    rows = [row("persistent", 0, "cold", 10.0), row("persistent", 0, "warm", 2.0), row("export", 0, "cold", 12.0),
            row("export", 0, "warm", 0.5), row("persistent", 1, "cold", 14.0), row("persistent", 1, "warm", 4.0),
            row("export", 1, "cold", 11.0), row("export", 1, "warm", 3.0)]  # fmt: skip
    _module("warm_compile").table(rows, "train")
    lines = capsys.readouterr().out.splitlines()
    export = next(line for line in lines if line.startswith("export"))
    assert "11.50 [11.00-12.00]" in export and "1.75 [0.50-3.00]" in export
    assert export.split()[-1] == "0.50"  # the median of 0.5 / 2 and 3 / 4
    assert lines[-1].startswith("same bits in every run: True")
    _module("warm_compile").table([*rows[:-1], row("export", 1, "warm", 3.0, digest="b")], "train")
    assert capsys.readouterr().out.splitlines()[-1].startswith("same bits in every run: False")


def _fake_sweep(leash: str, kl_metric: str = "kl"):
    """A sweep's tidy table: leash values 0.1 and 0.2, seeds 0 and 1, three updates of 100 env steps."""
    import pandas as pd

    rows = []
    returns = {(0.1, 0): [10.0, 480.0, 500.0], (0.1, 1): [10.0, 20.0, 30.0],
               (0.2, 0): [475.0, 500.0, 500.0], (0.2, 1): [10.0, 10.0, 476.0]}  # fmt: skip
    for (value, seed), rs in returns.items():
        for u, r in enumerate(rs):
            last = u == len(rs) - 1
            rows.append({leash: value, "seed": seed, "update": u + 1, "env_steps": 100 * (u + 1),
                         "episode_return": r, kl_metric: 0.01 * (u + 1) * (1 + seed),
                         "eval_return": 100.0 * value + seed if last else None})  # fmt: skip
    return pd.DataFrame(rows)


def test_kl_family_summary_counts_steps_to_threshold_and_kl_per_seed():
    kl_family = _module("kl_family")
    rows = kl_family.summarize(_fake_sweep("clip_eps"), "clip_eps", "kl", threshold=475.0, budget_steps=300)
    assert [r["value"] for r in rows] == [0.1, 0.2]
    loose, tight = rows
    # Seed 0 first reaches 475 at update 2 (200 steps); seed 1 never does: censored at 2 x 300.
    assert loose["steps_to_threshold"]["values"] == [200.0, 600.0] and loose["reached"] == 1
    assert tight["steps_to_threshold"]["values"] == [100.0, 300.0] and tight["reached"] == 2
    # Mean KL per update, per seed: 0.01 * mean(1, 2, 3) * (1 + seed).
    np.testing.assert_allclose(loose["mean_kl"]["values"], [0.02, 0.04])
    assert tight["final_return"]["values"] == [20.0, 21.0] and tight["final_return"]["median"] == 20.5
    assert tight["env_steps"] == 300


def test_kl_family_skips_unregistered_algorithms_and_unknown_leashes(monkeypatch):
    kl_family = _module("kl_family")
    table = {"ppo": kl_family.ALGORITHMS["ppo"],
             "future": kl_family.Entry("not-an-algo", "beta", (1.0, 2.0, 3.0)),
             "typo": kl_family.Entry("ppo", "no_such_field", (1.0, 2.0, 3.0))}  # fmt: skip
    monkeypatch.setattr(kl_family, "ALGORITHMS", table)
    lines = []
    assert list(kl_family.available(log=lines.append)) == ["ppo"]
    assert "not registered" in lines[0] and "no field 'no_such_field'" in lines[1]
    # Every entry of the real table names three strengths of a field its config has, once registered.
    from kl_rl.agents import ALGOS

    for name, entry in _module("kl_family").ALGORITHMS.items():
        assert len(entry.values) == 3, name
        if entry.algo in ALGOS:
            assert entry.leash in {f.name for f in dataclasses.fields(ALGOS[entry.algo].config)}, name


def test_kl_family_budget_is_env_steps_or_whole_cem_iterations():
    kl_family = _module("kl_family")
    assert kl_family.budget_overrides("ppo", "CartPole-v1", 100_000, {}) == {"total_steps": 100_000}
    # CEM's CartPole preset: 32 members x one 500-step episode = 16,000 env steps an iteration.
    assert kl_family.budget_overrides("cem", "CartPole-v1", 100_000, {}) == {"iterations": 6}
    assert kl_family.budget_overrides("cem", "CartPole-v1", 1_000, {}) == {"iterations": 1}


def test_kl_family_writes_every_seed_to_csv_and_markdown(tmp_path):
    kl_family = _module("kl_family")
    stats = kl_family.summarize(_fake_sweep("max_kl"), "max_kl", "kl", threshold=475.0, budget_steps=300)
    rows = [{"env": "CartPole-v1", "algo": "trpo", "leash": "max_kl", **r, "threshold": 475.0, "budget": 300,
             "seeds": 2, "compiled_programs": 1, "compile_s": 3.0, "sweep_run_s": 8.0, "run_s_per_value": 4.0,
             "diverged": []} for r in stats]  # fmt: skip
    kl_family.write({"frontier": {"rows": rows}}, tmp_path)
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[1].endswith("10.0 11.0") and lines[2].endswith("20.0 21.0")
    md = (tmp_path / "results.md").read_text()
    assert "| CartPole-v1 | trpo | max_kl=0.2 | 20.0, 21.0 |" in md
    assert "| CartPole-v1 | trpo | max_kl=0.1 | 10.5 [10.0, 11.0] | 10.5 | 400 (threshold 475) | 1/2 |" in md


def test_kl_family_speed_reports_gradient_steps_of_the_off_policy_agents(monkeypatch):
    kl_family = _module("kl_family")
    from kl_rl.agents import ALGOS

    asked = {}

    def fake_program(algo, overrides, steps, seeds, updates=0):
        asked[algo] = (steps, updates)
        config = ALGOS[algo].config()

        def run():
            return types.SimpleNamespace(eval_returns=np.zeros(1))

        if steps is None:  # off-policy: `updates` updates of its own rollout shape
            rollout = config.num_envs * config.num_steps
            return run, 1.0, seeds * updates * rollout, seeds * updates * config.grad_steps
        return run, 1.0, seeds * steps, None

    clock = iter(float(t) for t in range(1000))  # every timed run takes one second
    monkeypatch.setattr(kl_family, "_speed_program", fake_program)
    monkeypatch.setattr(kl_family.time, "perf_counter", lambda: next(clock))
    result = kl_family.speed("quick", ["ppo", "awr", "mpo", "cem"], log=lambda line: None)
    quick = kl_family.BUDGETS["quick"]
    # CEM is neither on-policy nor counted in gradient steps; the off-policy agents run updates.
    assert set(asked) == {"ppo", "awr", "mpo"} and asked["ppo"] == (quick["speed_steps"], quick["speed_updates"])
    assert asked["awr"] == (None, quick["speed_updates"]) == asked["mpo"]
    awr = ALGOS["awr"].config()
    assert awr.grad_steps == awr.critic_steps + awr.actor_steps == 350
    assert result["grad_steps_per_s"] == {"awr": [350.0], "mpo": [float(ALGOS["mpo"].config().grad_steps)]}
    assert result["env_steps_per_s"]["awr"] == [float(awr.num_envs * awr.num_steps)]
    rows = {line.split(" | ")[0][2:]: line for line in kl_family.tables({"speed": result}).splitlines()
            if line.startswith("| ") and " | " in line}  # fmt: skip
    assert rows["ppo"].split(" | ")[3] == "-" and rows["awr"].split(" | ")[3] == "350"
