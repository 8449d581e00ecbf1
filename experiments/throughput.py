"""Env steps/s of kl_rl's PPO at PureJaxRL's `ppo.py` default config, side by side with PureJaxRL.

    python experiments/throughput.py --seeds 1 --repeats 3 \\
        --anchor-python /work/anchors/venv/bin/python --purejaxrl-dir /work/anchors/purejaxrl

The config is PureJaxRL's CartPole default (4 envs x 128 steps, 4 epochs x 4 minibatches,
lr 2.5e-4 annealed, clipped value loss, ent 0.01, 5e5 steps), so both do the same work per
update. kl_rl's run includes its final 16-episode evaluation; PureJaxRL's has none. Compile
time is timed apart from run time; run time is the median over repeats of the compiled program.
Without --purejaxrl-dir only kl_rl is measured (see experiments/anchors/purejaxrl_ppo.py).

The rounds above run the two in separate processes, so each sees whatever load the machine had
at its time. --paired instead runs both in the anchor's process, in turns (see the anchor's
--paired-kl-rl), and reports the median of the per-pair ratios with a bootstrap interval:

    python experiments/throughput.py --paired --seeds 1 --repeats 20 \\
        --anchor-python /work/anchors/venv/bin/python --purejaxrl-dir /work/anchors/purejaxrl

--batching map vmap times kl_rl with each batching of a device's seeds (`kl_rl.parallel`): in
the paired mode all of them take turns with PureJaxRL in the one process, each pair a row of
all three. --seeds takes several counts, one anchor process each:

    python experiments/throughput.py --paired --seeds 8 16 --batching map vmap --repeats 4 \
        --total-steps 100000 --anchor-python /work/anchors/venv/bin/python --purejaxrl-dir /work/anchors/purejaxrl

--env gymnax/CartPole-v1 or gymnax/Breakout-MinAtar puts kl_rl on the gymnax adapter
(`kl_rl.envs.families`) against PureJaxRL on the same gymnax env; for a MinAtar game both sides
run PureJaxRL's MinAtar settings (64 envs, 8 minibatches, lr 5e-3, relu).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from kl_rl import envs, parallel, pipeline
from kl_rl.agents import PPOConfig
from kl_rl.train import TrainOutput, make_trainer

PUREJAXRL_DEFAULTS = dict(
    total_steps=500_000,
    num_envs=4,
    num_steps=128,
    update_epochs=4,
    num_minibatches=4,
    lr=2.5e-4,
    anneal_lr=True,
    gamma=0.99,
    gae_lambda=0.95,
    clip_eps=0.2,
    clip_value=True,
    ent_coef=0.01,
    vf_coef=0.5,
    max_grad_norm=0.5,
    hidden_sizes=(64, 64),
    activation="tanh",
)


# PureJaxRL's MinAtar settings on top of its defaults (examples/brax_minatar.ipynb), for both sides
# when the env is a MinAtar game.
PUREJAXRL_MINATAR = dict(num_envs=64, num_minibatches=8, lr=5e-3, activation="relu")


def purejaxrl_config(env: str, total_steps: int) -> PPOConfig:
    """PureJaxRL's PPO config for `env` (its CartPole defaults, or its MinAtar settings)."""
    minatar = PUREJAXRL_MINATAR if "MinAtar" in env else {}
    return PPOConfig(**{**PUREJAXRL_DEFAULTS, **minatar, "total_steps": total_steps})


def compile_kl_rl(seeds: int, total_steps: int, env: str = "CartPole-v1", batching: str | None = None):
    """Compiles kl_rl's PPO at PureJaxRL's config as `kl_rl.run` runs it (its segments, over
    every local device, each device's seeds batched by `batching`: "map", "vmap" or None for
    the platform's default); returns (run, compile_s, env_steps). No program cache: a cold compile.

    `env` is kl_rl's env id: its own CartPole-v1 port, or a gymnax id through the gymnax adapter
    ("gymnax/CartPole-v1", "gymnax/Breakout-MinAtar"). `run()` returns a `TrainOutput`. The
    programs are compiled (and run once) here."""
    config = purejaxrl_config(env, total_steps)
    trainer = make_trainer("ppo", config, envs.make(env))
    lay = parallel.layout(seeds, batching=batching)
    programs = parallel.Programs(trainer, lay)
    keys = jax.vmap(jax.random.key)(np.arange(seeds))

    def run():
        out = pipeline.execute(pipeline.Group(trainer, lay, programs), keys, [config] * seeds)
        return TrainOutput(out.state, out.metrics, out.eval_returns)

    run()
    return run, programs.compile_time_s, seeds * config.num_updates * config.batch_size


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_anchor(args, seeds: int) -> dict | list[dict]:
    """PureJaxRL's line (and in the paired mode, a line per kl_rl batching, then their ratios)."""
    script = Path(__file__).parent / "anchors" / "purejaxrl_ppo.py"
    cmd = [args.anchor_python or sys.executable, str(script), "--purejaxrl-dir", args.purejaxrl_dir,
           "--seeds", str(seeds), "--repeats", str(args.repeats), "--total-timesteps", str(args.total_steps),
           "--env", args.env.removeprefix("gymnax/"), "--kl-rl-env", args.env]
    if args.paired:
        cmd += ["--paired-kl-rl", "--kl-rl-batching", ",".join(b or "default" for b in args.batching)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "anchor failed")
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    return lines if args.paired else lines[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="one or more seed counts")
    parser.add_argument(
        "--batching", nargs="+", choices=parallel.BATCHING, default=[None],
        help="kl_rl's batching of a device's seeds, one or more (default: the platform's)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per round and implementation")
    parser.add_argument("--rounds", type=int, default=3, help="rounds alternating kl_rl and PureJaxRL")
    parser.add_argument("--total-steps", type=int, default=500_000)
    parser.add_argument("--anchor-python", default=None)
    parser.add_argument("--purejaxrl-dir", default=None)
    parser.add_argument("--paired", action="store_true", help="time both in one process, in turns")
    parser.add_argument(
        "--env", default="CartPole-v1",
        help="kl_rl's env: CartPole-v1 (its port) or gymnax/NAME (the adapter); PureJaxRL runs gymnax's NAME",
    )  # fmt: skip
    args = parser.parse_args()
    parallel.use_cpu_devices()  # as the kl-rl CLI does, before JAX starts
    if args.paired:
        if not args.purejaxrl_dir:
            parser.error("--paired needs --purejaxrl-dir")
        for seeds in args.seeds:
            for line in run_anchor(args, seeds):
                print(json.dumps(line), flush=True)
        return 0
    for seeds in args.seeds:
        separate_rounds(args, seeds)
    return 0


def separate_rounds(args, seeds: int) -> None:
    """kl_rl (each batching) and PureJaxRL in separate processes, round by round; prints JSON lines."""
    compiled = {b: compile_kl_rl(seeds, args.total_steps, args.env, b) for b in args.batching}
    ours = {b: [] for b in args.batching}
    outs, theirs, anchor = {}, [], None
    for _ in range(args.rounds if args.purejaxrl_dir else 1):
        for _ in range(args.repeats):
            for b, (run, _, _) in compiled.items():
                seconds, outs[b] = timed(run)
                ours[b].append(seconds)
        if args.purejaxrl_dir:
            anchor = run_anchor(args, seeds)
            theirs += anchor["run_s"]
    results = {}
    for b, (_, compile_s, steps) in compiled.items():
        lay = parallel.layout(seeds, batching=b)
        results[b] = {
            "impl": "kl_rl",
            "batching": lay.mode,
            "seeds": seeds,
            "env": args.env,
            "env_steps": steps,
            "compile_s": round(compile_s, 2),
            "run_s": [round(t, 3) for t in ours[b]],
            "env_steps_per_s": round(steps / statistics.median(ours[b])),
            "final_return_median": float(np.median(np.asarray(outs[b].eval_returns).mean(axis=1))),
            "devices": len(lay.devices),
            "jax": jax.__version__,
            "device": str(jax.devices()[0].device_kind),
        }
        print(json.dumps(results[b]), flush=True)
    if anchor is not None:
        rate = anchor["seeds"] * anchor["total_timesteps"] / statistics.median(theirs)
        anchor = {**anchor, "run_s": theirs, "env_steps_per_s": round(rate)}
        print(json.dumps(anchor))
        for result in results.values():
            ratio = round(result["env_steps_per_s"] / anchor["env_steps_per_s"], 3)
            print(json.dumps({"batching": result["batching"], "seeds": seeds, "kl_rl_over_purejaxrl": ratio}))


if __name__ == "__main__":
    sys.exit(main())
