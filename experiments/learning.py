"""Learning benchmarks: median final_return over seeds for each (algo, env) preset.

    python experiments/learning.py ppo CartPole-v1 --seeds 16
    python experiments/learning.py ppo Pendulum-v1 --seeds 16
    python experiments/learning.py --all --seeds 16    # every (algo, env) pair of docs/benchmarks.md

Each run is the preset exactly as `kl-rl train` would use it (override with --set NAME=VALUE).
Results go to experiments/results/<algo>-<env>.json and the run folder under runs/bench/.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import kl_rl
from kl_rl.cli.progress import Bar
from kl_rl.errors import ConfigError


ENVS = ("CartPole-v1", "Acrobot-v1", "Pendulum-v1", "MountainCarContinuous-v0")
HOST_ENVS = ("HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "LunarLander-v3")
"""Host-side envs (the mujoco and box2d extras); in the table when their results exist."""
ALGOS = ("vpg", "trpo", "ppo", "cem")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("algo", nargs="?")
    parser.add_argument("env", nargs="?")
    parser.add_argument("--all", action="store_true", help="every algo on every env, one after another")
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--out", default="experiments/results")
    parser.add_argument("--table", action="store_true", help="print the markdown table of the results in --out")
    args = parser.parse_args()
    if args.table:
        print(table(Path(args.out)))
        return 0
    if args.all == bool(args.algo and args.env):
        parser.error("give ALGO ENV, or --all")
    pairs = [(a, e) for e in ENVS for a in ALGOS] if args.all else [(args.algo, args.env)]
    overrides = dict(item.split("=", 1) for item in args.set)
    for algo, env in pairs:
        try:
            bench(algo, env, args.seeds, overrides, Path(args.out))
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0


def table(folder: Path) -> str:
    """The learning table of docs/benchmarks.md, from the result files in `folder`."""
    lines = [
        "| env | algo | budget per seed | seeds | median final_return | IQM | min .. max | wall (all seeds) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for env in ENVS + HOST_ENVS:
        for algo in ALGOS:
            path = folder / f"{algo}-{env}.json"
            if not path.exists():
                continue
            r = json.loads(path.read_text())
            budget = f"{r['env_steps']:,} steps"
            if algo == "cem":
                scored = r["scored_env_steps_median"]
                budget = f"{r['updates']} iterations = {r['env_steps']:,} steps ({scored:,.0f} scored)"
            lines.append(
                f"| {env} | {algo} | {budget} | {r['seeds']} | **{r['final_return_median']:.1f}** | "
                f"{r['final_return_iqm']:.1f} | {r['final_return_min']:.1f} .. {r['final_return_max']:.1f} | "
                f"{r['wall_time_s']:.1f} s + {r['compile_time_s']:.1f} s compile |"
            )
    return "\n".join(lines)


def bench(algo: str, env: str, seeds: int, overrides: dict, out: Path) -> None:
    """Runs one (algo, env) preset on `seeds` seeds and writes out/<algo>-<env>.json."""
    result = kl_rl.run(algo, env, seeds=seeds, progress=Bar(f"{algo} {env}"), **overrides)
    result.save(Path("runs/bench") / f"{algo}-{env}")
    final = result.final_returns
    record = {
        "algo": algo,
        "env": env,
        "overrides": overrides,
        "seeds": seeds,
        "env_steps": result.total_env_steps,
        "updates": int(result.metrics["env_steps"].shape[1]),
        "final_return_median": float(np.median(final)),
        "final_return_iqm": float(kl_rl.stats.iqm(final)),
        "final_return_min": float(final.min()),
        "final_return_max": float(final.max()),
        "final_returns": [round(float(x), 2) for x in final],
        "wall_time_s": round(result.wall_time_s, 2),
        "compile_time_s": round(result.compile_time_s, 2),
        "env_steps_per_s": round(result.env_steps_per_s),
        "env_path": result.env_path,
        "train_return_median": float(np.median(result.metrics["episode_return"][:, -1])),
    }
    if result.env_time_s is not None:  # host path: wall time inside the gymnasium envs
        record["env_time_s"] = round(result.env_time_s, 2)
    if "scored_steps" in result.metrics:  # CEM: env steps inside the scored episodes, per seed
        record["scored_env_steps_median"] = float(np.median(result.metrics["scored_steps"].sum(axis=1)))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{algo}-{env}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    sys.exit(main())
