"""The benchmark scripts' own arithmetic (the benchmarks themselves run outside the test suite)."""

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
