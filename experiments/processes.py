"""Throughput of one run as 2 processes x 1 device against 1 process x 2 devices (issue 24).

    PYTHONPATH=$PWD KL_RL_CACHE_DIR=off python experiments/processes.py --rounds 4 --seeds 8 \\
        --total-steps 81920

Each round runs the same `kl-rl train` (PPO on CartPole-v1) twice, in turns, the order
reversed every other round: once in one process with `--devices 2`, once as two processes
joined on 127.0.0.1 (`experiments/launch_local.py 2 ... --devices 1`, each pinned to its own
core unless `--no-pin`). It reads process 0's
table line (env steps/s of training, compile excluded, the gathers included), the same with its
`joined ... in` wait added to the training time, and times each command end to end
(start-up, joining, compiling, training, gathering and writing the folder), and once more
without the compile time it prints (each process compiles its programs itself), and checks
that the two runs' metrics.csv are byte-identical. Prints one markdown row per round and the
medians.
"""

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(command: list[str]) -> tuple[float, float, float, float]:
    """(env steps/s of the printed table, end-to-end seconds, compile seconds, env steps/s with the
    join's wait added to the training wall time) of one command."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-2000:]}")
    rate = re.search(r"([\d,]+) env steps/s on", done.stdout)
    compile_s = re.search(r"compile ([\d.]+)s", done.stdout)
    train_s = float(re.search(r"wall ([\d.]+)s", done.stdout).group(1))
    joined = re.search(r"joined \d+ processes in ([\d.]+)s", done.stdout)
    join_s = float(joined.group(1)) if joined else 0.0
    rate_s = float(rate.group(1).replace(",", ""))
    return rate_s, wall, float(compile_s.group(1)), rate_s * train_s / (train_s + join_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--total-steps", type=int, default=81920)
    parser.add_argument("--no-pin", action="store_true", help="leave the two processes unpinned (launch_local.py)")
    args = parser.parse_args()
    run = ["train", "--algo", "ppo", "--env", "CartPole-v1", "--seeds", str(args.seeds),
           "--total-steps", str(args.total_steps), "--no-progress"]  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            one_out, two_out = Path(tmp) / f"one{r}", Path(tmp) / f"two{r}"
            one = [sys.executable, "-m", "kl_rl.cli", *run, "--devices", "2", "--out", str(one_out)]
            pin = ["--no-pin"] if args.no_pin else []
            launch = [sys.executable, str(HERE / "launch_local.py"), *pin, "2"]
            two = [*launch, *run, "--devices", "1", "--out", str(two_out)]
            order = [("one", one), ("two", two)] if r % 2 == 0 else [("two", two), ("one", one)]
            got = {name: timed(command) for name, command in order}
            same = (one_out / "metrics.csv").read_bytes() == (two_out / "metrics.csv").read_bytes()
            rows.append((got["one"], got["two"], same))
            (r1, w1, c1, _), (r2, w2, c2, j2) = got["one"], got["two"]
            print(f"| {r + 1} | {r1:,.0f} ({w1:.1f} s, compile {c1:.1f} s) "
                  f"| {r2:,.0f} ({w2:.1f} s, compile {c2:.1f} s) "
                  f"| {r2 / r1:.2f} | {j2 / r1:.2f} | {(w1 - c1) / (w2 - c2):.2f} | {w1 / w2:.2f} | "
                  f"{'identical' if same else 'DIFFERENT'} |", flush=True)  # fmt: skip
    train = statistics.median(two[0] / one[0] for one, two, _ in rows)
    joining = statistics.median(two[3] / one[0] for one, two, _ in rows)
    but_compile = statistics.median((one[1] - one[2]) / (two[1] - two[2]) for one, two, _ in rows)
    whole = statistics.median(one[1] / two[1] for one, two, _ in rows)
    print(
        f"median ratio, 2 processes over 1: training {train:.2f}x, training and joining {joining:.2f}x, "
        f"end to end but compiling {but_compile:.2f}x, "
        f"end to end {whole:.2f}x; metrics identical in {sum(x for *_, x in rows)} of {len(rows)} rounds"
    )


if __name__ == "__main__":
    main()
