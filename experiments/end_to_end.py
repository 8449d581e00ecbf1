"""Whole-process wall time of "PPO on CartPole-v1, 100k steps, 1 seed": kl_rl against SB3.

Each measurement is the wall time of one entire process, timed around `subprocess.run`:
interpreter start, imports, compile or cache load, training, evaluation, writing results.
Three kinds, run in turns within each of --rounds rounds, the order reversed every other round:

- kl_rl_cold: `kl-rl train --algo ppo --env CartPole-v1 --seeds 1 --no-progress --out DIR`
  (the ppo/CartPole-v1 preset: rl-baselines3-zoo's settings, 100k steps) with KL_RL_CACHE_DIR,
  kl_rl's persistent compilation cache folder, set to a fresh empty folder each time.
- kl_rl_warm: the same, with KL_RL_CACHE_DIR set to one folder that an untimed run filled first.
- sb3: `experiments/anchors/sb3_ppo.py --seed 0` (SB3 PPO, the zoo's CartPole-v1 settings).

Prints one JSON line per measurement (with the kl_rl run's summary.json compile_time_s,
wall_time_s, final_return, or sb3_ppo.py's JSON), then a summary line with the median wall time of
each kind and the ratios sb3 / kl_rl_warm and sb3 / kl_rl_cold (above 1: kl_rl's process is faster).
SB3's venv is set up as described in experiments/anchors/sb3_ppo.py. Reproduce, from the repo root:

    .venv/bin/python experiments/end_to_end.py --sb3-python /work/anchors/sb3venv/bin/python --rounds 3
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SB3_SCRIPT = HERE / "anchors" / "sb3_ppo.py"
KINDS = ("kl_rl_cold", "kl_rl_warm", "sb3")


def summarize(walls: dict[str, list[float]]) -> dict:
    """Median wall seconds per kind and SB3's median over each kl_rl median (pure; for tests)."""
    med = {kind: statistics.median(values) for kind, values in walls.items()}
    return {
        "median_wall_s": med,
        "sb3_over_kl_rl_warm": med["sb3"] / med["kl_rl_warm"],
        "sb3_over_kl_rl_cold": med["sb3"] / med["kl_rl_cold"],
    }


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Runs `cmd` from the repo root; returns its wall seconds and stdout. Exits if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=HERE.parent, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"end_to_end: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kl-rl-python", default=sys.executable, help="python of kl_rl's venv")
    parser.add_argument("--sb3-python", required=True, help="python of the SB3 venv")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    kl_rl = [str(Path(args.kl_rl_python).parent / "kl-rl"), "train", "--algo", "ppo", "--env", "CartPole-v1"]
    kl_rl += ["--seeds", "1", "--no-progress"]
    tmp_dir = tempfile.TemporaryDirectory(prefix="end_to_end-")  # run folders and caches, removed at exit
    tmp = Path(tmp_dir.name)
    warm_cache = tmp / "warm-cache"
    runs = 0

    def run_kl_rl(cache: Path) -> tuple[float, dict]:
        nonlocal runs
        runs += 1
        out = tmp / f"run-{runs}"
        wall, _ = timed([*kl_rl, "--out", str(out)], env={**os.environ, "KL_RL_CACHE_DIR": str(cache)})
        summary = json.loads((out / "summary.json").read_text())
        keys = ("compile_time_s", "wall_time_s", "final_return", "compiled_from_cache")
        return wall, {k: summary.get(k) for k in keys}

    def measure(kind: str) -> tuple[float, dict]:
        if kind == "kl_rl_cold":
            return run_kl_rl(Path(tempfile.mkdtemp(prefix="cold-cache-", dir=tmp)))
        if kind == "kl_rl_warm":
            return run_kl_rl(warm_cache)
        wall, stdout = timed([args.sb3_python, str(SB3_SCRIPT), "--seed", "0"])
        sb3 = json.loads(stdout.strip().splitlines()[-1])
        return wall, {k: sb3[k] for k in ("learn_s", "total_s", "final_return", "env_steps")}

    run_kl_rl(warm_cache)  # untimed: fills the warm cache
    walls: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for r in range(args.rounds):
        for kind in KINDS if r % 2 == 0 else KINDS[::-1]:
            wall, details = measure(kind)
            walls[kind].append(wall)
            print(json.dumps({"round": r, "kind": kind, "wall_s": round(wall, 3), **details}), flush=True)
    print(json.dumps({"rounds": args.rounds, "cpus": os.cpu_count(), **summarize(walls)}))
    tmp_dir.cleanup()


if __name__ == "__main__":
    main()
