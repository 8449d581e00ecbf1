"""Fingerprints of learning-table rows, to check that a change leaves results bit-identical.

    python experiments/fingerprint.py out.json                       # in this checkout
    git worktree add /tmp/before REV && (cd /tmp/before && PYTHONPATH=$PWD python \\
        $OLDPWD/experiments/fingerprint.py /tmp/before.json)          # in another revision
    python experiments/fingerprint.py --compare /tmp/before.json out.json

Each row is an (algo, env) preset at 16 seeds, as experiments/learning.py runs it; its
fingerprint is every seed's final return and the sum of every update's `kl`. Run it with
KL_RL_CACHE_DIR=off so neither side loads the other's compiled programs.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROWS = [("ppo", "CartPole-v1"), ("vpg", "CartPole-v1"), ("trpo", "CartPole-v1"), ("cem", "CartPole-v1"),
        ("ppo", "Pendulum-v1")]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--seeds", type=int, default=16)
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(Path(path).read_text()) for path in args.compare)
        same = True
        for row in before:
            equal = all(before[row][k] == after[row][k] for k in ("final_return", "kl_sum"))
            same &= equal
            median = np.median(after[row]["final_return"])
            print(f"{row}: {'bit-identical' if equal else 'DIFFERENT'} (median {median:g})")
        return 0 if same else 1
    if not args.out:
        parser.error("give OUT.json, or --compare BEFORE AFTER")
    import kl_rl
    from kl_rl import parallel

    parallel.use_cpu_devices()
    out = {}
    for algo, env in ROWS:
        result = kl_rl.run(algo, env, seeds=args.seeds)
        out[f"{algo} {env}"] = {"final_return": [float(x) for x in result.final_returns],
                                "kl_sum": float(np.sum(result.metrics["kl"].astype(np.float64)))}  # fmt: skip
        print(algo, env, np.median(result.final_returns), flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
