"""Learning benchmarks: median final_return over seeds for each (algo, env) preset.

    python experiments/learning.py ppo CartPole-v1 --seeds 16
    python experiments/learning.py ppo Pendulum-v1 --seeds 16

Each run is the preset exactly as `kl-rl train` would use it (override with --set NAME=VALUE).
Results go to experiments/results/<algo>-<env>.json and the run folder under runs/bench/.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import kl_rl
from kl_rl.errors import ConfigError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("algo")
    parser.add_argument("env")
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--out", default="experiments/results")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    try:
        result = kl_rl.run(args.algo, args.env, seeds=args.seeds, progress=True, **overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result.save(Path("runs/bench") / f"{args.algo}-{args.env}")
    final = result.final_returns
    record = {
        "algo": args.algo,
        "env": args.env,
        "overrides": overrides,
        "seeds": args.seeds,
        "env_steps": result.total_env_steps,
        "final_return_median": float(np.median(final)),
        "final_return_iqm": float(kl_rl.runner.iqm(final)),
        "final_return_min": float(final.min()),
        "final_return_max": float(final.max()),
        "final_returns": [round(float(x), 2) for x in final],
        "wall_time_s": round(result.wall_time_s, 2),
        "compile_time_s": round(result.compile_time_s, 2),
        "env_steps_per_s": round(result.env_steps_per_s),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.algo}-{args.env}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
