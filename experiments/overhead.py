"""What the progress bar and checkpoints cost a compiled run.

    python experiments/overhead.py [--algo ppo] [--env CartPole-v1] [--seeds 4] [--rounds 3]
                                   [--checkpoint-every 10] [--total-steps N]

Trains the same run (the preset's budget) in one process four ways, `--rounds` times each in
turn, and reports the median run time (compilation excluded, reported apart):

- plain: the run's usual segments (about 20), nothing reported between them;
- progress: the same, reporting progress between segments (what `kl-rl train` shows as a bar),
  here to a no-op function so the terminal does not enter the measurement;
- segments: the run split at checkpoints (`--checkpoint-every` updates) with no saving, i.e.
  what that other cut costs;
- checkpoints: the same with orbax saves every `--checkpoint-every` updates into a temporary
  folder (asynchronous; the last save is waited for).

Writes experiments/results/overhead-<algo>-<env>.json.
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from unittest import mock

import kl_rl
from kl_rl import resolve


def _once(args, mode: str) -> tuple[float, float]:
    kwargs = dict(seeds=args.seeds, progress=None)  # every device the process has
    if args.total_steps:
        kwargs["total_steps"] = args.total_steps
    if mode == "progress":
        kwargs["progress"] = lambda done, total: None
    with tempfile.TemporaryDirectory() as tmp:
        if mode in ("segments", "checkpoints"):
            kwargs.update(checkpoint_dir=tmp, checkpoint_every=args.checkpoint_every)
        if mode == "segments":
            with mock.patch("kl_rl.checkpoint.Checkpointer.save"):
                result = kl_rl.run(args.algo, args.env, **kwargs)
        else:
            result = kl_rl.run(args.algo, args.env, **kwargs)
    return result.wall_time_s, result.compile_time_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algo", default="ppo")
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--total-steps", type=int, default=0, help="0: the preset's budget")
    args = parser.parse_args()
    modes = ["plain", "progress", "segments", "checkpoints"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    compile_s: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes:
            wall, comp = _once(args, mode)
            times[mode].append(wall)
            compile_s[mode].append(comp)
            print(f"round {r + 1} {mode:<12} run {wall:6.2f} s   compile {comp:5.1f} s", flush=True)
    config = resolve.resolve_config(
        args.algo, args.env, overrides={"total_steps": args.total_steps} if args.total_steps else None
    )
    out = {
        "algo": args.algo,
        "env": args.env,
        "seeds": args.seeds,
        "num_updates": config.num_updates,
        "checkpoint_every": args.checkpoint_every,
        "run_time_s": times,
        "compile_time_s": compile_s,
        "median_run_time_s": {m: statistics.median(v) for m, v in times.items()},
    }
    base = out["median_run_time_s"]["plain"]
    for mode in modes:
        median = out["median_run_time_s"][mode]
        print(f"{mode:<12} median run {median:6.2f} s  ({median / base:.3f}x plain)")
    path = Path(__file__).parent / "results" / f"overhead-{args.algo}-{args.env}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
