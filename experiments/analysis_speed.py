"""Time of kl_rl.analysis.interval_estimates: stratified bootstrap CIs of four aggregate metrics.

    python experiments/analysis_speed.py [--reps 10000] [--seeds 16] [--tasks 5] [--algos 4] [--repeats 5]

Scores are drawn from N(0.5, 0.2); every algorithm's CIs of mean, median, IQM and optimality
gap come from the same `reps` resamples. Prints the median wall time over `--repeats` calls
(after one warm-up call) and the spread.
"""

import argparse
import statistics
import time

import numpy as np

from kl_rl import analysis


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--algos", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    scores = {f"algo{i}": rng.normal(0.5, 0.2, size=(args.seeds, args.tasks)) for i in range(args.algos)}
    metrics = ["mean", "median", "iqm", "optimality_gap"]
    analysis.interval_estimates(scores, metrics, reps=args.reps)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        analysis.interval_estimates(scores, metrics, reps=args.reps)
        times.append(time.perf_counter() - start)
    print(
        f"interval_estimates: {args.algos} algos x {len(metrics)} metrics, {args.seeds} seeds x {args.tasks} tasks, "
        f"{args.reps:,} reps: median {statistics.median(times):.3f} s over {args.repeats} repeats "
        f"(min {min(times):.3f}, max {max(times):.3f})"
    )


if __name__ == "__main__":
    main()
