"""Learning checks on the JAX-native env families (gymnax MinAtar, Brax), through `kl_rl.run`.

    python experiments/families.py learn                 # every check, at the budgets below
    python experiments/families.py learn ppo-breakout    # one check
    python experiments/families.py --table               # the docs' table from the saved results

Each check trains its seeds in one `kl_rl.run` (all seeds in one program, spread over the CPU
cores) and saves experiments/results/families-<check>.json: every seed's final return (the
greedy policy's mean over its evaluation episodes), the median with a 95% percentile-bootstrap
interval, the IQM with its interval, the median over seeds of the training episode return per
update (the curve PureJaxRL plots), wall and compile time. Needs the gymnax and brax extras.

Budgets (CPU, 2 cores): the MinAtar PPO checks run PureJaxRL's MinAtar settings and budget
(`kl_rl.presets.PUREJAXRL_MINATAR`, 1e7 steps per seed); the others run budgets this CPU can.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"

# name: (algo, env, seeds, overrides, what it is compared with)
CHECKS = {
    "ppo-breakout": (
        "ppo", "gymnax/Breakout-MinAtar", 16, {},
        "PureJaxRL's published curve (README, minatar_plot): about 40 at 1e7 steps (band about 30-55)",
    ),
    "ppo-spaceinvaders": (
        "ppo", "gymnax/SpaceInvaders-MinAtar", 4, {},
        "PureJaxRL's notebook runs these settings on SpaceInvaders; no published curve",
    ),
    "trpo-breakout": (
        "trpo", "gymnax/Breakout-MinAtar", 4,
        dict(total_steps=5_000_000, num_envs=64, num_steps=128, activation="relu"),
        "the PPO check above at half its budget",
    ),
    "ppo-hopper": (
        "ppo", "brax/hopper", 4,
        dict(total_steps=1_000_000, num_envs=16, num_steps=128, num_minibatches=32, update_epochs=10,
             lr=3e-4, ent_coef=0.0, normalize_obs=True, normalize_reward=True),
        "a random policy (about 20 per episode); Brax's own PPO needs ~6M steps for ~2500+",
    ),
    "cem-inverted-pendulum": (
        "cem", "brax/inverted_pendulum", 4, dict(iterations=30),
        "the maximum, 1000 (one per step balanced, 1000 steps)",
    ),
}  # fmt: skip


def median_ci(x: np.ndarray, reps: int = 10_000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    meds = np.median(x[rng.integers(0, len(x), (reps, len(x)))], axis=1)
    low, high = np.percentile(meds, [2.5, 97.5])
    return float(low), float(high)


def learn(name: str) -> dict:
    import kl_rl
    from kl_rl import runfolder, stats
    from kl_rl.cli.progress import Bar

    algo, env, seeds, overrides, compare = CHECKS[name]
    start = time.perf_counter()
    result = kl_rl.run(algo, env, seeds=seeds, progress=Bar(f"{algo} {env}"), **overrides)
    finals = np.asarray(result.final_returns, np.float64)
    curve = np.nanmedian(np.asarray(result.metrics["episode_return"], np.float64), axis=0)
    iqm_low, iqm_high = stats.bootstrap_iqm_ci(finals)
    med_low, med_high = median_ci(finals)
    steps = np.asarray(result.metrics["env_steps"][0])
    record = {
        "check": name,
        "algo": algo,
        "env": env,
        "seeds": seeds,
        "overrides": overrides,
        "env_steps_per_seed": result.total_env_steps,
        "final_returns": [round(float(v), 3) for v in finals],
        "median": float(np.median(finals)),
        "median_ci95": [med_low, med_high],
        "iqm": stats.iqm(finals),
        "iqm_ci95": [iqm_low, iqm_high],
        "train_return_last": float(curve[-1]),
        "curve_steps": steps[:: max(1, len(steps) // 50)].tolist(),
        "curve_train_return": [round(float(v), 3) for v in curve[:: max(1, len(steps) // 50)]],
        "wall_s": round(result.wall_time_s, 1),
        "compile_s": round(result.compile_time_s, 1),
        "process_s": round(time.perf_counter() - start, 1),
        "env_steps_per_s": round(result.env_steps_per_s),
        "compared_with": compare,
        "provenance": runfolder.provenance(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"families-{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"{name}: median {record['median']:.2f} [{med_low:.2f}, {med_high:.2f}], IQM {record['iqm']:.2f} "
        f"[{iqm_low:.2f}, {iqm_high:.2f}] over {seeds} seeds; train return {record['train_return_last']:.2f}; "
        f"wall {record['wall_s']} s + compile {record['compile_s']} s",
        flush=True,
    )
    return record


def table() -> None:
    print(
        "| check | algo | env | seeds | steps/seed | median final [95% CI] | IQM [95% CI] | train return (last) "
        "| wall + compile |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in CHECKS:
        path = RESULTS / f"families-{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        print(
            f"| {name} | {r['algo']} | {r['env']} | {r['seeds']} | {r['env_steps_per_seed']:,} | "
            f"**{r['median']:.2f}** [{r['median_ci95'][0]:.2f}, {r['median_ci95'][1]:.2f}] | "
            f"{r['iqm']:.2f} [{r['iqm_ci95'][0]:.2f}, {r['iqm_ci95'][1]:.2f}] | {r['train_return_last']:.2f} | "
            f"{r['wall_s']} + {r['compile_s']} s |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=["learn"])
    parser.add_argument("checks", nargs="*", help=f"checks to run (default all): {', '.join(CHECKS)}")
    parser.add_argument("--table", action="store_true", help="print the results table")
    args = parser.parse_args()
    if args.table:
        table()
        return 0
    if args.command != "learn":
        parser.error("give a command (learn) or --table")
    unknown = [c for c in args.checks if c not in CHECKS]
    if unknown:
        parser.error(f"unknown check {unknown[0]!r}; use one of {', '.join(CHECKS)}")
    from kl_rl import parallel

    parallel.use_cpu_devices()
    for name in args.checks or CHECKS:
        learn(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
