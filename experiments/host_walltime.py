"""Wall time of one host-side run, split into env stepping, updates and the rest.

    python experiments/host_walltime.py ppo HalfCheetah-v5            # the preset: 1M steps, seed 0
    python experiments/host_walltime.py trpo HalfCheetah-v5 --seeds 5
    python experiments/host_walltime.py --callback-overhead          # one no-op io_callback in a scan

Runs `kl_rl.run` as `kl-rl train` would (compile excluded from the wall time) and reports:
- env: wall time inside the gymnasium vector env's step and reset (measured by `HostVecEnv`);
- updates: the agent's jitted `update` timed alone on the run's final batch, times the number of
  updates (each update is the same program on a batch of the same shape);
- the rest: the policy's forward passes, the callbacks' transfers, normalizers and the
  evaluation's policy, by difference.
Writes experiments/results/walltime-<algo>-<env>.json.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

import kl_rl
from kl_rl.cli.progress import Bar
from kl_rl import buffer
from kl_rl.agents import ALGOS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("algo", nargs="?")
    parser.add_argument("env", nargs="?")
    parser.add_argument("--callback-overhead", action="store_true", help="time a no-op io_callback and exit")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--vectorization", default="sync")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--out", default="experiments/results")
    args = parser.parse_args()
    if args.callback_overhead:
        print(f"one io_callback in a lax.scan: {callback_overhead_us():.1f} us")
        return 0
    if not (args.algo and args.env):
        parser.error("give ALGO ENV, or --callback-overhead")
    overrides = dict(item.split("=", 1) for item in args.set)
    bar = Bar(f"{args.algo} {args.env}")
    result = kl_rl.run(
        args.algo, args.env, seeds=args.seeds, vectorization=args.vectorization, progress=bar, **overrides
    )
    bar.close()
    updates = int(result.metrics["env_steps"].shape[1])
    update_s = time_update(result)
    wall = result.wall_time_s
    record = {
        "algo": args.algo,
        "env": args.env,
        "seeds": args.seeds,
        "vectorization": args.vectorization,
        "overrides": overrides,
        "env_steps_per_seed": result.total_env_steps,
        "wall_time_s": round(wall, 1),
        "compile_time_s": round(result.compile_time_s, 1),
        "env_steps_per_s": round(result.env_steps_per_s),
        "env_time_s": round(result.env_time_s, 1),
        "update_time_s": round(update_s * updates, 1),
        "env_share": round(result.env_time_s / wall, 3),
        "update_share": round(update_s * updates / wall, 3),
        "final_returns": [round(float(x), 1) for x in result.final_returns],
        "final_return_median": round(float(np.median(result.final_returns)), 1),
        "device": str(jax.devices()[0].device_kind),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"walltime-{args.algo}-{args.env}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


def time_update(result, repeats: int = 10) -> float:
    """Seconds of one jitted update (all seeds, vmapped as in the run) on the run's final batch."""
    state = result.final_state
    env = kl_rl.envs.make(result.env_id, result.env_path)
    agent = ALGOS[result.algo].make(result.config, env.observation_space, env.action_space)

    def update(key, agent_state, buf):
        return agent.update(key, agent_state, buffer.ordered(buf), 0.5)

    fn = jax.jit(jax.vmap(update))
    keys = jax.random.split(jax.random.key(0), len(result.seeds))
    jax.block_until_ready(fn(keys, state.agent, state.buffer))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(keys, state.agent, state.buffer))
    return (time.perf_counter() - start) / repeats


def callback_overhead_us(steps: int = 20_000) -> float:
    """Microseconds per step of a lax.scan whose body is one no-op io_callback returning an
    observation-sized array (what the host path pays per env step besides the env itself)."""
    from jax.experimental import io_callback

    obs = np.zeros((1, 17), np.float32)

    def body(carry, _):
        out = io_callback(lambda a: obs, jax.ShapeDtypeStruct((1, 17), np.float32), carry)
        return carry + out[:, :6], None

    fn = jax.jit(lambda: jax.lax.scan(body, jax.numpy.zeros((1, 6)), None, length=steps)[0])
    jax.block_until_ready(fn())
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return (time.perf_counter() - start) / steps * 1e6


if __name__ == "__main__":
    sys.exit(main())
