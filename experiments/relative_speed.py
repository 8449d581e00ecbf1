"""Env steps/s of on-policy agents relative to PPO at the same config, side by side in one process.

    python experiments/relative_speed.py --algos ppo vmpo --env CartPole-v1 --seeds 4 --rounds 5

Every algorithm gets the same shared fields (rollout shape, epochs, minibatches, lr, discount,
lambda, gradient clip, value coefficient; PureJaxRL's CartPole settings by default) and its own
defaults for the rest, so each update sees the same data in the same minibatches. The programs
are compiled first (compile time reported apart), then run in turns, `--rounds` times, with the
order rotated every round, so a change in the machine's load reaches all of them alike. Each
round gives every algorithm a ratio of its env steps/s over PPO's in that round; the report is
the median ratio and the median env steps/s. Final evaluation is included, as in a real run.

Writes experiments/results/relative-speed-<env>.json.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from kl_rl import envs, parallel, pipeline
from kl_rl.agents import ALGOS
from kl_rl.train import make_trainer

SHARED = dict(num_envs=4, num_steps=128, update_epochs=4, num_minibatches=4, lr=2.5e-4, gamma=0.99, gae_lambda=0.95,
              max_grad_norm=0.5, vf_coef=0.5)  # fmt: skip


def compile_run(algo: str, env_id: str, seeds: int, total_steps: int):
    """(run, compile_s, env steps per run) of `algo` at the shared config, as `kl_rl.run` lays it out."""
    config = ALGOS[algo].config(**SHARED, total_steps=total_steps)
    trainer = make_trainer(algo, config, envs.make(env_id))
    lay = parallel.layout(seeds)
    programs = parallel.Programs(trainer, lay)
    keys = jax.vmap(jax.random.key)(np.arange(seeds))

    def run():
        out = pipeline.execute(pipeline.Group(trainer, lay, programs), keys, [config] * seeds)
        jax.block_until_ready(out.eval_returns)

    run()
    return run, programs.compile_time_s, seeds * config.num_updates * config.batch_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", nargs="+", default=["ppo", "vmpo"], help="the first is the baseline")
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--total-steps", type=int, default=100_000)
    args = parser.parse_args()
    runs, compile_s, steps = {}, {}, {}
    for algo in args.algos:
        runs[algo], compile_s[algo], steps[algo] = compile_run(algo, args.env, args.seeds, args.total_steps)
    rates = {algo: [] for algo in args.algos}
    for r in range(args.rounds):
        order = args.algos[r % len(args.algos):] + args.algos[: r % len(args.algos)]
        for algo in order:
            start = time.perf_counter()
            runs[algo]()
            rates[algo].append(steps[algo] / (time.perf_counter() - start))
    base = args.algos[0]
    result = {"env": args.env, "seeds": args.seeds, "total_steps": args.total_steps, "rounds": args.rounds,
              "config": SHARED, "devices": jax.device_count(), "platform": jax.default_backend(),
              "algos": {}}  # fmt: skip
    for algo in args.algos:
        ratios = [a / b for a, b in zip(rates[algo], rates[base], strict=True)]
        result["algos"][algo] = {
            "env_steps_per_s": statistics.median(rates[algo]),
            "ratio_to_" + base: statistics.median(ratios),
            "ratios": [round(x, 4) for x in ratios],
            "compile_s": compile_s[algo],
        }
        rounds = ", ".join(f"{x:.3f}" for x in ratios)
        print(f"{algo:6s} {statistics.median(rates[algo]):>12,.0f} env steps/s   x{statistics.median(ratios):.3f} of "
              f"{base} (rounds: {rounds})   compile {compile_s[algo]:.1f} s")  # fmt: skip
    out = Path(__file__).parent / "results" / f"relative-speed-{args.env}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
