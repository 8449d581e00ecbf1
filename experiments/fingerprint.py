"""Fingerprints of runs, to check that a change leaves results bit-identical.

    python experiments/fingerprint.py out.json                       # in this checkout
    git worktree add /tmp/before REV && (cd /tmp/before && PYTHONPATH=$PWD python \\
        $OLDPWD/experiments/fingerprint.py /tmp/before.json)          # in another revision
    python experiments/fingerprint.py --compare /tmp/before.json out.json

Two suites (`--suite`, default both):

- `short`: short runs that cover every path of the loop and the drivers: PPO, VPG, TRPO and CEM
  on CartPole, PPO on Pendulum, PPO with a frozen reference (KL in the loss and in the reward)
  and with policy lag and replay, a run started from another (--init-from), SFT then GRPO and
  RLOO on a token task with the SFT run as reference, a sweep and an Optuna tune. Each
  run's fingerprint is the sha256 of every metric's [seeds, updates] array and of its
  evaluation returns, so any changed bit anywhere shows.
- `table`: the learning table's rows (an (algo, env) preset at 16 seeds, as
  experiments/learning.py runs them): every seed's final return and the sum of every update's `kl`.

Run it with KL_RL_CACHE_DIR=off so neither side loads the other's compiled programs.
"""

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROWS = [("ppo", "CartPole-v1"), ("vpg", "CartPole-v1"), ("trpo", "CartPole-v1"), ("cem", "CartPole-v1"),
        ("ppo", "Pendulum-v1")]  # fmt: skip
SHORT = dict(total_steps=4096)


def digest(array) -> str:
    array = np.ascontiguousarray(np.asarray(array))
    return hashlib.sha256(f"{array.dtype}{array.shape}".encode() + array.tobytes()).hexdigest()[:16]


def run_print(result) -> dict:
    """Every metric's and the evaluation returns' digests."""
    out = {f"metric {k}": digest(v) for k, v in sorted(result.metrics.items())}
    out["eval_returns"] = digest(result.eval_returns)
    out["final_return"] = [float(x) for x in result.final_returns]
    return out


def short_suite() -> dict:
    import kl_rl
    from kl_rl import sweep, tune

    out = {}
    tmp = Path(tempfile.mkdtemp(prefix="fingerprint-"))

    def record(name, result):
        out[name] = run_print(result)
        print(name, np.median(result.final_returns), flush=True)
        return result

    teacher = record("ppo CartPole-v1", kl_rl.run("ppo", "CartPole-v1", seeds=2, **SHORT))
    teacher.save(tmp / "teacher")
    record("vpg CartPole-v1", kl_rl.run("vpg", "CartPole-v1", seeds=2, **SHORT))
    record("trpo CartPole-v1", kl_rl.run("trpo", "CartPole-v1", seeds=2, **SHORT))
    record("cem CartPole-v1", kl_rl.run("cem", "CartPole-v1", seeds=2, iterations=3))
    record("ppo Pendulum-v1", kl_rl.run("ppo", "Pendulum-v1", seeds=2, **SHORT))
    record("ppo reference loss", kl_rl.run("ppo", "CartPole-v1", seeds=2, reference=tmp / "teacher",
                                           ref_kl_coef=0.5, **SHORT))  # fmt: skip
    lagged = dict(ref_kl_coef=0.1, ref_kl_in="reward", policy_lag=2, **SHORT)
    record("ppo reference reward lag", kl_rl.run("ppo", "CartPole-v1", seeds=2, reference=tmp / "teacher", **lagged))
    record("ppo replay vtrace", kl_rl.run("ppo", "CartPole-v1", seeds=2, replay_rollouts=2, **SHORT))
    record("vpg init-from", kl_rl.run("vpg", "CartPole-v1", seeds=2, init_from=tmp / "teacher", **SHORT))
    # stop_at_accuracy=0: the SFT program as it was before the preset stopped at an accuracy.
    sft = record("sft Addition-v0", kl_rl.run("sft", "Addition-v0", seeds=1, total_steps=2048, eval_episodes=64,
                                              stop_at_accuracy=0.0))  # fmt: skip
    sft.save(tmp / "sft")
    for algo in ("grpo", "rloo", "ppo-lm"):
        record(f"{algo} Addition-v0", kl_rl.run(algo, "Addition-v0", seeds=2, reference=tmp / "sft",
                                                 total_steps=2048, eval_episodes=64))  # fmt: skip
    swept = sweep.run_sweep("ppo", "CartPole-v1", {"lr": [3e-4, 1e-3], "num_envs": [4, 8]}, seeds=2,
                            overrides=SHORT)  # fmt: skip
    out["sweep"] = {f"metric {k}": digest(v) for k, v in sorted(swept.metrics.items())}
    out["sweep"]["eval_returns"] = digest(swept.eval_returns)
    print("sweep", np.nanmedian(swept.final_returns), flush=True)
    space = tune.parse_space("ppo", ["lr=log:1e-4:1e-2", "clip_eps=0.1:0.3"])
    tuned = tune.run_tune("ppo", "CartPole-v1", space, trials=4, batch_size=2, seeds=2, storage=None,
                          study_name="fingerprint", overrides=SHORT, startup_trials=2, rungs=2)  # fmt: skip
    out["tune"] = {"trials": [[t["number"], t["state"], t["params"], t["value"]] for t in tuned.trials]}
    print("tune", tuned.best, flush=True)
    return out


def table_suite(seeds: int) -> dict:
    import kl_rl

    out = {}
    for algo, env in ROWS:
        result = kl_rl.run(algo, env, seeds=seeds)
        out[f"{algo} {env}"] = {"final_return": [float(x) for x in result.final_returns],
                                "kl_sum": float(np.sum(result.metrics["kl"].astype(np.float64)))}  # fmt: skip
        print(algo, env, np.median(result.final_returns), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--suite", choices=("short", "table", "all"), default="all")
    parser.add_argument("--seeds", type=int, default=16, help="seeds of the table suite")
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(Path(path).read_text()) for path in args.compare)
        same = True
        for row in before:
            if row not in after:
                print(f"{row}: missing in {args.compare[1]}")
                same = False
                continue
            changed = sorted(k for k in before[row] if before[row][k] != after[row].get(k))
            same &= not changed
            status = "bit-identical" if not changed else "DIFFERENT: " + ", ".join(changed)
            print(f"{row}: {status} ({len(before[row])} fields)")
        return 0 if same else 1
    if not args.out:
        parser.error("give OUT.json, or --compare BEFORE AFTER")
    from kl_rl import parallel

    parallel.use_cpu_devices()
    out = {}
    if args.suite in ("short", "all"):
        out.update(short_suite())
    if args.suite in ("table", "all"):
        out.update(table_suite(args.seeds))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
