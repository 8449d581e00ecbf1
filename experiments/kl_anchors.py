"""The two new KL anchors, measured: kickstarting, fine-tuning on a leash, and stale data.

    python experiments/kl_anchors.py --budget full                 # all three studies, 16 seeds
    python experiments/kl_anchors.py stale --budget small          # one study, CI-sized

- kickstart: PPO students learn CartPole-v1 and Acrobot-v1 from scratch, with and without a KL
  pull toward a finished PPO run (the teacher, `--reference`); env steps until the training
  return first reaches 475 (CartPole) or -100 (Acrobot).
- leash: PPO fine-tunes an early CartPole-v1 policy (`--init-from`) held near it
  (`--reference`): the frontier of final return against KL(pi || pi_ref) over `ref_kl_coef`,
  then the estimators (exact, k1, k2, k3) and the penalty's placement (loss, reward) at one beta.
- stale: PPO on CartPole-v1 with actors lagging 0, 1, 2, 4 and 8 updates behind (`policy_lag`)
  and with replay of the last 1, 2 and 4 rollouts at equal env steps (`replay_rollouts`), each
  without corrections, with the truncated importance weights (`is_correction`: V-trace and the
  decoupled clip), and with those plus a KL penalty to the behaviour policy.

Every run is a `kl_rl.sweep.run_sweep` (one compiled program per static group), saved under
runs/anchors_<budget>/ at the repository root (git-ignored). A full-budget sweep already there is
read back instead of rerun. The summary of each study goes to
experiments/results/anchors-<study>.json (full budget), which docs/benchmarks.md reports and
notebooks/04_kl_anchors.ipynb draws.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import kl_rl
from kl_rl import analysis, parallel, resolve, stats, sweep
from kl_rl import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
STUDIES = ("kickstart", "leash", "stale")
"""The studies run by default; `cost` (the anchors' speed) runs when named."""

BUDGETS = {
    # CI: every code path, a few updates, as few compiled programs as that allows.
    "small": {"seeds": 2, "teacher_seeds": 1, "envs": ("CartPole-v1",), "steps": {"CartPole-v1": 2048},
              "early_steps": 2048, "finetune_steps": 2048, "stale_steps": 2048, "lags": (4,), "replay": (2,),
              "betas": (0.0, 1.0), "estimators": {"ref_kl_estimator": ["k3"], "ref_kl_in": ["loss"]}},
    # The published numbers: 16 seeds at the presets' budgets.
    "full": {"seeds": 16, "teacher_seeds": 2, "envs": ("CartPole-v1", "Acrobot-v1"),
             "steps": {"CartPole-v1": 100_000, "Acrobot-v1": 200_000}, "early_steps": 10_000,
             "finetune_steps": 50_000, "stale_steps": 100_000, "lags": (1, 2, 4, 8), "replay": (2, 4),
             "betas": (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
             "estimators": {"ref_kl_estimator": ["exact", "k1", "k2", "k3"], "ref_kl_in": ["loss", "reward"]}},
}  # fmt: skip
THRESHOLDS = {"CartPole-v1": 475.0, "Acrobot-v1": -100.0}
KICKSTART_BETA = 1.0
"""The pull toward the teacher: forward KL(pi_teacher || pi) in the loss, kickstarting's
distillation term (Schmitt et al. 2018) without its annealing."""
LEASH_BETA = 0.3
"""The beta at which the estimators and placements are compared."""
BEHAVIOUR_BETA = 1.0
"""beta of the penalty beta KL(pi_behaviour || pi) on stale data."""


def variant(is_correction: bool, behaviour_kl_coef: float) -> str:
    """The name of a correction on stale data: none, truncated importance weights (V-trace and
    the decoupled clip), a penalty toward the behaviour policy, or both."""
    return {(False, False): "none", (True, False): "IS", (False, True): "behaviour KL",
            (True, True): "IS + behaviour KL"}[(bool(is_correction), behaviour_kl_coef > 0)]  # fmt: skip


def runs_dir(budget: str) -> Path:
    return ROOT / "runs" / f"anchors_{budget}"


def _sweep(budget: str, name: str, env: str, grid: dict, overrides: dict, log=print, **anchors) -> pd.DataFrame:
    """One sweep of PPO, saved as runs/anchors_<budget>/<name> and read back as a tidy table.

    At the full budget a folder already there is read back without rerunning it.
    """
    folder = runs_dir(budget) / name
    if not (budget == "full" and (folder / "summary.json").exists()):
        start = time.perf_counter()
        seeds = BUDGETS[budget]["seeds"]
        result = sweep.run_sweep("ppo", env, grid, seeds, overrides=overrides, log=log, **anchors)
        base = config_lib.to_dict(resolve.resolve_config("ppo", env, None, overrides))
        result.save(folder, {"algo": "ppo", "env": env, "seeds": seeds, **base})
        log(f"{name}: {len(result.points)} point(s) x {seeds} seeds in {time.perf_counter() - start:.0f}s")
    return analysis.load(folder)


_MADE: dict[tuple, Path] = {}
"""The teachers this process has trained, by (budget, env, steps): the small budget's early
policy is its teacher, trained once."""


def _teacher(budget: str, env: str, steps: int, name: str) -> Path:
    """A PPO run of `env` at its preset (cut to `steps`), reused when its folder exists."""
    folder = runs_dir(budget) / name
    if (budget, env, steps) in _MADE:
        return _MADE[budget, env, steps]
    if not (budget == "full" and (folder / "summary.json").exists()):
        kl_rl.run("ppo", env, seeds=BUDGETS[budget]["teacher_seeds"], total_steps=steps).save(folder)
    _MADE[budget, env, steps] = folder
    return folder


def ci(values, level: float = 0.95) -> dict:
    """IQM and median of per-seed values, with the IQM's percentile-bootstrap 95% CI."""
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    lo, hi = stats.bootstrap_iqm_ci(values) if len(finite) == len(values) else (float("nan"), float("nan"))
    return {"iqm": stats.iqm(values), "ci95": [lo, hi], "median": float(np.median(values)),
            "values": [float(v) for v in values]}  # fmt: skip


def steps_to_threshold(df: pd.DataFrame, threshold: float, budget_steps: int) -> pd.Series:
    """Per seed, the env steps at the first update whose training return reached `threshold`;
    a seed that never did gets 2 x budget (censored: counted as slower than any that did)."""

    def first(rows):
        hit = rows[rows["episode_return"] >= threshold]
        return float(hit["env_steps"].min()) if len(hit) else 2.0 * budget_steps

    return df.sort_values("update").groupby("seed")[["episode_return", "env_steps"]].apply(first)


def final_per_seed(df: pd.DataFrame, metric: str, last: float = 0.1) -> pd.Series:
    """Per seed, the mean of `metric` over the last `last` fraction of updates."""
    cut = df["update"].max() * (1.0 - last)
    return df[df["update"] > cut].groupby("seed")[metric].mean()


def eval_per_seed(df: pd.DataFrame) -> pd.Series:
    """Per seed, the final policy's evaluation return."""
    return df.dropna(subset=["eval_return"]).groupby("seed")["eval_return"].first()


def kickstart(budget: str, log=print) -> dict:
    """Env steps to the threshold with (ref_kl_coef = KICKSTART_BETA) and without (0) a teacher."""
    out = {"beta": KICKSTART_BETA, "direction": "forward", "envs": {}}
    for env in BUDGETS[budget]["envs"]:
        threshold, steps = THRESHOLDS[env], BUDGETS[budget]["steps"][env]
        teacher = _teacher(budget, env, steps, f"teacher-{env}")
        df = _sweep(budget, f"kickstart-{env}", env, {"ref_kl_coef": [0.0, KICKSTART_BETA]},
                    {"total_steps": steps, "ref_kl_direction": "forward"}, log, reference=teacher)  # fmt: skip
        arms = {}
        for beta, rows in df.groupby("ref_kl_coef"):
            arm = "teacher" if beta > 0 else "no teacher"
            arms[arm] = {
                "steps_to_threshold": ci(steps_to_threshold(rows, threshold, steps)),
                "final_return": ci(eval_per_seed(rows)),
                "reached": int((steps_to_threshold(rows, threshold, steps) <= steps).sum()),
            }
        ratio = arms["teacher"]["steps_to_threshold"]["median"] / arms["no teacher"]["steps_to_threshold"]["median"]
        teacher_summary = json.loads((teacher / "summary.json").read_text())
        out["envs"][env] = {"threshold": threshold, "budget": steps, "arms": arms, "median_ratio": ratio,
                            "teacher_final_return": teacher_summary["final_return"]}  # fmt: skip
    return out


def leash(budget: str, log=print) -> dict:
    """Fine-tuning an early policy on a leash: return against KL to it, over beta and estimators."""
    env, b = "CartPole-v1", BUDGETS[budget]
    early = _teacher(budget, env, b["early_steps"], "early-CartPole-v1")
    anchors = {"reference": early, "init_from": early}
    base = {"total_steps": b["finetune_steps"]}
    frontier_df = _sweep(budget, "leash-frontier", env, {"ref_kl_coef": list(b["betas"])}, base, log, **anchors)
    frontier = []
    for beta, rows in frontier_df.groupby("ref_kl_coef"):
        frontier.append({"ref_kl_coef": float(beta), "final_return": ci(eval_per_seed(rows)),
                         "kl_ref": ci(final_per_seed(rows, "kl_ref"))})  # fmt: skip
    est_df = _sweep(budget, "leash-estimators", env, b["estimators"], {**base, "ref_kl_coef": LEASH_BETA}, log,
                    **anchors)  # fmt: skip
    estimators = []
    for (estimator, placement), rows in est_df.groupby(["ref_kl_estimator", "ref_kl_in"]):
        estimators.append({"estimator": estimator, "placement": placement, "final_return": ci(eval_per_seed(rows)),
                           "kl_ref": ci(final_per_seed(rows, "kl_ref"))})  # fmt: skip
    early_summary = json.loads((early / "summary.json").read_text())
    return {"early_final_return": early_summary["final_return"], "early_steps": b["early_steps"],
            "finetune_steps": b["finetune_steps"], "beta": LEASH_BETA, "frontier": frontier,
            "estimators": estimators}  # fmt: skip


def stale(budget: str, log=print) -> dict:
    """Final return and KL to the behaviour policy under policy lag and replay, per correction.

    Each lag (and each replay length) is two programs, with and without the importance
    corrections (a static switch); the behaviour-KL coefficient is traced, so 0 and
    BEHAVIOUR_BETA share them.
    """
    env, b = "CartPole-v1", BUDGETS[budget]
    steps = b["stale_steps"]
    rows_out = []

    def record(kind, value, name, rows):
        rows_out.append({"kind": kind, "value": int(value), "variant": name,
                         "final_return": ci(eval_per_seed(rows)),
                         "kl_behaviour": ci(final_per_seed(rows, "kl_behaviour")),
                         "ess": ci(final_per_seed(rows, "ess"))})  # fmt: skip

    fresh = _sweep(budget, "stale-fresh", env, {"policy_lag": [0]}, {"total_steps": steps}, log)
    record("policy_lag", 0, "fresh data", fresh)
    corrections = {"is_correction": [False, True], "behaviour_kl_coef": [0.0, BEHAVIOUR_BETA]}
    for kind, values in (("policy_lag", b["lags"]), ("replay_rollouts", b["replay"])):
        df = _sweep(budget, f"stale-{kind}", env, {kind: list(values), **corrections}, {"total_steps": steps}, log)
        for (value, is_correction, beta), rows in df.groupby([kind, "is_correction", "behaviour_kl_coef"]):
            record(kind, value, variant(is_correction, beta), rows)
    lag0 = rows_out[0]["final_return"]["median"]
    ratios = {r["variant"]: r["final_return"]["median"] / lag0 for r in rows_out
              if r["kind"] == "policy_lag" and r["value"] == 4}  # fmt: skip
    return {"budget": steps, "behaviour_beta": BEHAVIOUR_BETA, "rows": rows_out, "lag4_over_lag0": ratios}


COST_SETTINGS = {
    "plain": {},
    "reference, exact in the loss": {"ref_kl_coef": 0.3},
    "reference, k1 in the reward": {"ref_kl_coef": 0.3, "ref_kl_in": "reward", "ref_kl_estimator": "k1"},
    "policy lag 4": {"policy_lag": 4},
    "replay 2 rollouts": {"replay_rollouts": 2},
    "replay 4 rollouts": {"replay_rollouts": 4},
}


def cost(budget: str, log=print, rounds: int = 3) -> dict:
    """Env steps per second of PPO on CartPole-v1 (its preset, 8 seeds) with each anchor on,
    measured in turns in one process, compile apart, as ratios to the plain run of each round."""
    b = BUDGETS[budget]
    reference = _teacher(budget, "CartPole-v1", b["early_steps"], "early-CartPole-v1")
    seeds, steps = min(b["seeds"], 8), b["stale_steps"]
    configs = {name: resolve.resolve_config("ppo", "CartPole-v1", None, {"total_steps": steps, **settings})
               for name, settings in COST_SETTINGS.items()}  # fmt: skip
    rates: dict[str, list[float]] = {name: [] for name in COST_SETTINGS}
    for _ in range(rounds):
        for name, config in configs.items():
            ref = reference if config.ref_kl_coef > 0 else None
            result = kl_rl.run("ppo", "CartPole-v1", seeds=seeds, config=config, reference=ref)
            rates[name].append(result.env_steps_per_s)
        log(", ".join(f"{n} {r[-1]:,.0f}" for n, r in rates.items()))
    plain = np.asarray(rates["plain"])
    return {"seeds": seeds, "steps": steps, "rounds": rounds, "env_steps_per_s": rates,
            "ratio_to_plain": {n: float(np.median(np.asarray(r) / plain)) for n, r in rates.items()}}  # fmt: skip


def _fmt(stats: dict, digits: int = 0) -> str:
    lo, hi = stats["ci95"]
    return f"{stats['iqm']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def tables(folder: Path = RESULTS) -> str:
    """docs/benchmarks.md's tables, from the studies' result files in `folder`."""
    out = []
    path = folder / "anchors-kickstart.json"
    if path.exists():
        r = json.loads(path.read_text())
        out += ["| env | threshold | arm | env steps to threshold: IQM [95% CI] | median | reached "
                "| final return IQM |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for env, e in r["envs"].items():
            for arm, a in e["arms"].items():
                s = a["steps_to_threshold"]
                out.append(f"| {env} | {e['threshold']:g} | {arm} | {_fmt(s)} | {s['median']:.0f} | "
                           f"{a['reached']}/{len(s['values'])} | {a['final_return']['iqm']:.1f} |")  # fmt: skip
            out.append(f"| {env} | | teacher / no teacher, medians | **{e['median_ratio']:.2f}** | | | |")
        out.append("")
    path = folder / "anchors-leash.json"
    if path.exists():
        r = json.loads(path.read_text())
        out += ["| ref_kl_coef | final return: IQM [95% CI] | final kl_ref: IQM [95% CI] |", "|---|---|---|"]
        for row in r["frontier"]:
            out.append(f"| {row['ref_kl_coef']:g} | {_fmt(row['final_return'], 1)} | {_fmt(row['kl_ref'], 4)} |")
        out += ["", f"At ref_kl_coef = {r['beta']:g}:", "",
                "| estimator | placement | final return: IQM [95% CI] | final kl_ref: IQM [95% CI] |",
                "|---|---|---|---|"]  # fmt: skip
        for row in r["estimators"]:
            out.append(f"| {row['estimator']} | {row['placement']} | {_fmt(row['final_return'], 1)} | "
                       f"{_fmt(row['kl_ref'], 4)} |")  # fmt: skip
        out.append("")
    path = folder / "anchors-stale.json"
    if path.exists():
        r = json.loads(path.read_text())
        out += ["| stale data | correction | final return: IQM [95% CI] | median | kl_behaviour (median) "
                "| ess (median) |", "|---|---|---|---|---|---|"]  # fmt: skip
        for row in r["rows"]:
            what = "fresh (lag 0, K = 1)" if row["variant"] == "fresh data" else f"{row['kind']} {row['value']}"
            out.append(f"| {what} | {row['variant']} | {_fmt(row['final_return'], 1)} | "
                       f"{row['final_return']['median']:.1f} | {row['kl_behaviour']['median']:.5f} | "
                       f"{row['ess']['median']:.4f} |")  # fmt: skip
        ratios = ", ".join(f"{k} {v:.2f}" for k, v in r["lag4_over_lag0"].items())
        out += ["", f"Median final return at policy lag 4 over lag 0's: {ratios}.", ""]
    path = folder / "anchors-cost.json"
    if path.exists():
        r = json.loads(path.read_text())
        out += ["| PPO CartPole-v1 | env steps/s (median of rounds) | ratio to plain (median) |", "|---|---|---|"]
        for name, rates in r["env_steps_per_s"].items():
            out.append(f"| {name} | {np.median(rates):,.0f} | {r['ratio_to_plain'][name]:.2f} |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "studies", nargs="*", metavar="STUDY", help=f"any of {', '.join(STUDIES)} (default: all), or cost"
    )
    parser.add_argument("--budget", choices=tuple(BUDGETS), default="full")
    parser.add_argument("--table", action="store_true", help="print docs/benchmarks.md's tables from the results")
    args = parser.parse_args()
    if args.table:
        print(tables())
        return 0
    unknown = [s for s in args.studies if s not in (*STUDIES, "cost")]
    if unknown:
        parser.error(f"unknown study {unknown[0]!r}; use any of {', '.join(STUDIES)}, cost")
    parallel.use_cpu_devices()
    for study in args.studies or STUDIES:
        start = time.perf_counter()
        result = {"study": study, "budget": args.budget, **globals()[study](args.budget)}
        result["wall_s"] = time.perf_counter() - start
        if args.budget == "full":
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / f"anchors-{study}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "frontier", "estimators")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
