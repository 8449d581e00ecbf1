"""Cached against uncached sampling of the token policy, side by side in one process (issue 26,
item 4): tokens per second of the one collector's rollouts at GRPO's Addition-v0 preset (256
envs, 32 prompts x 8, the task's 5-token responses), from an SFT reference's policy.

    python experiments/kv_cache.py --reference RUN_DIR [--seeds 1 8] [--batching map vmap] [--rounds 7]
        [--out FILE]

Each variant is compiled once (`kl_rl.train.collect` after the episodic reset, as
`kl_rl.train.update_step` runs it; the seeds one after another with `map`, as `kl-rl train`
runs them on a CPU device, or as one batch with `vmap`, as with `--batching vmap` and on a GPU),
then the two take turns: each round times `--rollouts` rollouts of one and then of
the other, the order alternating from round to round, so load that comes and goes on a shared
machine falls on both. Tokens are sampled tokens, envs x steps (5 per env per rollout).
"""

import argparse
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from kl_rl import buffer, envs, resolve, rollout, sources, train
from kl_rl.agents import ALGOS

ENV, ALGO = "Addition-v0", "grpo"
KINDS = (("cached", True), ("uncached", False))


def sampler(kv_cache: bool, reference: str, seeds: int, batching: str):
    """(a jitted rollout(keys) over `seeds` seeds batched as `batching`, tokens per call) at the
    preset, policy = the reference's."""
    config = resolve.resolve_config(ALGO, ENV, None, {"kv_cache": kv_cache})
    env = envs.make(ENV)
    vec_env = envs.vectorize(env, config.num_envs, group_size=config.group_size)
    vec_env.params = config.rollout.task_params
    agent = ALGOS[ALGO].make(config, vec_env.observation_space, vec_env.action_space)
    setup = sources.resolve_sources(ALGO, ENV, config, reference=reference).setup(list(range(seeds)))
    steps = env.response_length
    loop = train.Loop(ALGOS[ALGO].make, config.rollout, vec_env, None, 1, steps, config.num_envs * steps, steps,
                      None, None)  # fmt: skip

    def one(key, ref_params):
        reset_key, init_key, collect_key = jax.random.split(key, 3)
        agent_state = agent.init(init_key)
        agent_state = agent_state.replace(params={"policy": ref_params})
        collector = rollout.init_collector(vec_env.reset(reset_key), vec_env.observation_space.shape)
        collector = train.episodic_start(loop, config, agent, collector)
        _, traj, _ = train.collect(loop, collect_key, agent, agent_state, collector, steps, config)
        return traj.action, buffer.in_first_episode(traj)

    params = setup.reference.agent.params["policy"]
    if batching == "vmap":
        fn = jax.jit(jax.vmap(one))
    else:
        fn = jax.jit(lambda keys, params: jax.lax.map(lambda xs: one(*xs), (keys, params)))
    return (lambda keys: fn(keys, params)), seeds * config.num_envs * steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="an SFT run folder (its seed s's policy samples seed s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--batching", nargs="+", choices=("map", "vmap"), default=["map", "vmap"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rollouts", type=int, default=10, help="rollouts per variant per round")
    parser.add_argument("--out", default="experiments/results/kv-cache.json")
    args = parser.parse_args()
    results = {"load_before": os.getloadavg(), "jax": jax.__version__, "rows": []}
    for seeds, batching in [(s, b) for s in args.seeds for b in args.batching if s > 1 or b == "map"]:
        fns = {}
        for kv in (True, False):
            fn, tokens = sampler(kv, args.reference, seeds, batching)
            keys = jax.random.split(jax.random.key(0), seeds)
            start = time.perf_counter()
            jax.block_until_ready(fn(keys))
            fns[kv] = (fn, keys, time.perf_counter() - start)
        # Same keys and policy: the tokens of each env's first response (the ones an update
        # reads; the cached rollout keeps its cache past them, `rollout.collect`) should be the
        # same, except where the cached and uncached logits round differently at a sampled token.
        out = {kv: [np.asarray(x) for x in fns[kv][0](fns[kv][1])] for kv in fns}
        first = out[True][1] & out[False][1]
        same = float(np.mean(out[True][0][first] == out[False][0][first]))
        times = {True: [], False: []}
        for r in range(args.rounds):
            for kv in (True, False) if r % 2 == 0 else (False, True):
                fn, keys, _ = fns[kv]
                start = time.perf_counter()
                for i in range(args.rollouts):
                    out = fn(jax.random.split(jax.random.key(100 + i), seeds))
                jax.block_until_ready(out)
                times[kv].append((time.perf_counter() - start) / args.rollouts)
        ratios = [u / c for c, u in zip(times[True], times[False], strict=True)]
        row = {
            "seeds": seeds,
            "batching": batching,
            "tokens_per_rollout": tokens,
            "compile_s": {"cached": fns[True][2], "uncached": fns[False][2]},
            "rollout_s": {"cached": times[True], "uncached": times[False]},
            "tokens_per_s_median": {kind: tokens / float(np.median(times[kv])) for kind, kv in KINDS},
            "speedup_per_round": ratios,
            "speedup_median": float(np.median(ratios)),
            "same_tokens_fraction": same,
        }
        results["rows"].append(row)
        print(f"{seeds} seed(s), {batching}: cached {row['tokens_per_s_median']['cached']:,.0f} tokens/s, uncached "
              f"{row['tokens_per_s_median']['uncached']:,.0f} tokens/s, speedup median {row['speedup_median']:.2f}x "
              f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)}); same tokens {same:.4f}", flush=True)  # fmt: skip
    results["load_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"load average before {results['load_before']}, after {results['load_after']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
