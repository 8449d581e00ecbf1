"""Cold compile time of kl_rl's PPO against PureJaxRL's, at PureJaxRL's config, in fresh processes.

    python experiments/compile_time.py --seeds 1 --rounds 5 \\
        --anchor-python /work/anchors/venv/bin/python --purejaxrl-dir /work/anchors/purejaxrl

Each round starts one process for each, in alternating order, with no cache: kl_rl traces and
compiles the programs `kl_rl.run` needs (init, the segment, evaluate; `Programs.prepare`) over
every core as the CLI lays them out; PureJaxRL's anchor times `jit(train).lower().compile()`
(its `--seeds > 1` vmaps). Prints one JSON line per process and a summary with the medians.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

KL_RL = """
import json, sys
from kl_rl import parallel
parallel.use_cpu_devices()
import jax, numpy as np
sys.path.insert(0, {experiments!r})
from throughput import PUREJAXRL_DEFAULTS
from kl_rl import envs
from kl_rl.agents import PPOConfig
from kl_rl.train import make_trainer
seeds = {seeds}
config = PPOConfig(**{{**PUREJAXRL_DEFAULTS, "total_steps": 500_000}})
programs = parallel.Programs(make_trainer("ppo", config, envs.make("CartPole-v1")), parallel.layout(seeds))
keys = parallel.pad(jax.vmap(jax.random.key)(np.arange(seeds)), programs.layout)
configs = parallel.pad(parallel.stack([config] * seeds), programs.layout)
programs.prepare(keys, configs, parallel.segments(config.num_updates))
print(json.dumps({{"impl": "kl_rl", "seeds": seeds, "compile_s": round(programs.compile_time_s, 3)}}))
"""


def summarize(times: dict[str, list[float]]) -> dict:
    """Medians per implementation and kl_rl's over PureJaxRL's (below 1: kl_rl compiles faster)."""
    medians = {impl: statistics.median(ts) for impl, ts in times.items()}
    return {"median_compile_s": medians, "kl_rl_over_purejaxrl": round(medians["kl_rl"] / medians["purejaxrl"], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--anchor-python", required=True)
    parser.add_argument("--purejaxrl-dir", required=True)
    args = parser.parse_args()
    here = Path(__file__).parent
    env = {**os.environ, "KL_RL_CACHE_DIR": "off"}
    commands = {
        "kl_rl": [sys.executable, "-c", KL_RL.format(experiments=str(here), seeds=args.seeds)],
        "purejaxrl": [args.anchor_python, str(here / "anchors" / "purejaxrl_ppo.py"), "--purejaxrl-dir",
                      args.purejaxrl_dir, "--seeds", str(args.seeds), "--repeats", "1"],
    }  # fmt: skip
    times: dict[str, list[float]] = {impl: [] for impl in commands}
    for r in range(args.rounds):
        for impl in list(commands)[:: 1 if r % 2 == 0 else -1]:
            proc = subprocess.run(commands[impl], env=env, capture_output=True, text=True, check=True)
            line = json.loads(proc.stdout.strip().splitlines()[0])
            times[impl].append(line["compile_s"])
            print(json.dumps({"round": r, "impl": impl, "seeds": args.seeds, "compile_s": line["compile_s"]}))
    print(json.dumps({"seeds": args.seeds, **summarize(times)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
