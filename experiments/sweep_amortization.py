"""A 16-point x 4-seed PPO grid on CartPole-v1: one `kl-rl sweep` beside 16 `kl-rl train` commands.

    python experiments/sweep_amortization.py

The grid is lr in {3e-4, 1e-3, 3e-3, 1e-2} x clip_eps in {0.1, 0.2} x ent_coef in {0, 0.01},
each point 4 seeds at the PPO CartPole preset (100k steps). Both sides run as fresh processes
with default flags (progress bar on, so JAX's persistent cache, which skips programs with host
callbacks, plays no part in `kl-rl train`); the sweep runs with --out in a temporary folder.
Wall times and their ratio go to experiments/results/sweep-amortization.json.
"""

import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GRID = {"lr": ["3e-4", "1e-3", "3e-3", "1e-2"], "clip_eps": ["0.1", "0.2"], "ent_coef": ["0", "0.01"]}
CLI = [sys.executable, "-m", "kl_rl.cli"]


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    return time.perf_counter() - start, proc.stdout


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        grid = [f"{name}={','.join(values)}" for name, values in GRID.items()]
        sweep_s, log = timed([*CLI, "sweep", "--algo", "ppo", "--env", "CartPole-v1", "--grid", *grid,
                              "--seeds", "4", "--out", f"{tmp}/sweep"])  # fmt: skip
        print(log, flush=True)
        separate = []
        for i, values in enumerate(itertools.product(*GRID.values())):
            flags = [item for name, value in zip(GRID, values, strict=True) for item in (f"--{name}", value)]
            seconds, _ = timed([*CLI, "train", "--algo", "ppo", "--env", "CartPole-v1", "--seeds", "4",
                                "--out", f"{tmp}/train-{i}", *flags])  # fmt: skip
            separate.append(seconds)
            print(f"train {i + 1}/16: {seconds:.1f}s", flush=True)
    record = {
        "sweep_s": sweep_s,
        "separate_s": sum(separate),
        "separate_each_s": separate,
        "ratio": sweep_s / sum(separate),
        "sweep_log": log.splitlines(),
    }
    out = ROOT / "experiments" / "results" / "sweep-amortization.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"sweep {sweep_s:.1f}s, separate {sum(separate):.1f}s, ratio {record['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
