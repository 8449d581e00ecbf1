"""Times PureJaxRL's `ppo.py` (CartPole-v1, its default config) for a side-by-side benchmark.

None of PureJaxRL's code is in this repository: this script imports `make_train` from a
checkout whose path is given with --purejaxrl-dir. Setup, all outside the repo (gymnax 1.0.1
needs gymnasium<1.4, so the anchor gets its own venv):

    # PureJaxRL at commit 31756b197773a52db763fdbe6d635e4b46522a73 (the tip of main)
    git clone https://github.com/luchris429/purejaxrl /work/anchors/purejaxrl
    git -C /work/anchors/purejaxrl checkout 31756b197773a52db763fdbe6d635e4b46522a73
    python3 -m venv /work/anchors/venv
    /work/anchors/venv/bin/pip install jax==0.10.2 jaxlib==0.10.2 gymnax==1.0.1 gymnasium==1.3.0 \
        flax==0.12.8 optax==0.2.8 chex==0.1.92 distrax==0.1.9 tfp-nightly==0.26.0.dev20261027

    /work/anchors/venv/bin/python experiments/anchors/purejaxrl_ppo.py \
        --purejaxrl-dir /work/anchors/purejaxrl --seeds 1 --repeats 3

(distrax 0.1.9 depends on tfp-nightly; the dev build above is the one that resolved and works.)

Three adaptations, made here at import time; PureJaxRL's files are used unedited:
- Its wrappers.py imports brax and navix at module level for envs this benchmark does not use;
  empty stand-in modules take their place, so those heavy packages need not be installed.
- It was written against gymnax 0.0.x, whose `step` returned (obs, state, reward, done, info)
  with done = terminated or time-truncated. gymnax 1.0 returns six values,
  (obs, state, reward, terminated, truncated, info), and CartPole's `terminated` no longer
  includes the 500-step limit, so `step` is adapted back to the five values with
  done = terminated | truncated, which is what PureJaxRL's code was written for.
- With --seeds > 1, flax's orthogonal initializer (a QR) would run as one QR batched over seeds,
  which deadlocks jaxlib 0.10.2 on 2 cores (see `serialize_batched_orthogonal`); it is run once
  per seed instead. Same initializer, same keys, same values; only init is affected.

The config is the dict in the `__main__` block of their ppo.py (read with `ast.literal_eval`,
not executed), with DEBUG off and TOTAL_TIMESTEPS from the command line; if that block cannot
be read, the same defaults written out below are used. Compile is timed apart from the runs.
One seed uses `jax.jit(train)` as their `__main__` does; more use `jax.jit(jax.vmap(train))`.
Prints one JSON line.

With --paired-kl-rl, kl_rl's PPO at the same config (experiments/throughput.py's
`compile_kl_rl`) is compiled in the same process, and the two compiled programs run in turns,
--repeats times each, the order alternating from pair to pair. Each pair gives one ratio of
env steps/s (kl_rl over PureJaxRL); the pairs see the same machine load, which separate
processes do not. A second JSON line gives kl_rl's times and the ratios' median with a 95%
percentile-bootstrap interval. kl_rl must be importable here (its dependencies are in the venv
above; the repo root is put on sys.path). --kl-rl-batching map,vmap compiles one kl_rl program
per batching of a device's seeds; then each pair is a turn of all of them and PureJaxRL, in an
order rotated from turn to turn, and each batching gets its line, then one line of the ratios
of every batching over the first, pair by pair.
"""

import argparse
import ast
import json
import math
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

# PureJaxRL's ppo.py defaults, used only if its __main__ config cannot be read.
FALLBACK_CONFIG = {
    "LR": 2.5e-4,
    "NUM_ENVS": 4,
    "NUM_STEPS": 128,
    "TOTAL_TIMESTEPS": 5e5,
    "UPDATE_EPOCHS": 4,
    "NUM_MINIBATCHES": 4,
    "GAMMA": 0.99,
    "GAE_LAMBDA": 0.95,
    "CLIP_EPS": 0.2,
    "ENT_COEF": 0.01,
    "VF_COEF": 0.5,
    "MAX_GRAD_NORM": 0.5,
    "ACTIVATION": "tanh",
    "ENV_NAME": "CartPole-v1",
    "ANNEAL_LR": True,
    "DEBUG": False,
}


def fail(message: str) -> int:
    print(f"purejaxrl_ppo: error: {message}", file=sys.stderr)
    return 2


def read_main_config(ppo_file: Path):
    """The `config = {...}` literal in ppo.py's `if __name__ == "__main__":` block, or None."""
    try:
        tree = ast.parse(ppo_file.read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if not (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)):
            continue
        if not (isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"):
            continue
        for stmt in node.body:
            if (
                isinstance(stmt, ast.Assign)
                and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name)
                and stmt.targets[0].id == "config"
            ):
                try:
                    config = ast.literal_eval(stmt.value)
                except ValueError:
                    return None
                return config if isinstance(config, dict) else None
    return None


def stub_unused_modules() -> None:
    """Empty brax/navix modules: wrappers.py imports them but CartPole never uses them."""
    names = ("brax", "brax.envs", "brax.envs.wrappers", "brax.envs.wrappers.training", "navix")
    for name in names:
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["brax"].envs = sys.modules["brax.envs"]
    sys.modules["brax.envs"].wrappers = sys.modules["brax.envs.wrappers"]
    sys.modules["brax.envs.wrappers"].training = sys.modules["brax.envs.wrappers.training"]
    sys.modules["brax.envs.wrappers.training"].EpisodeWrapper = object
    sys.modules["brax.envs.wrappers.training"].AutoResetWrapper = object


def adapt_gymnax_step() -> None:
    """gymnax>=1.0 `step` -> the five-value gymnax 0.0.x `step` PureJaxRL expects."""
    import jax.numpy as jnp
    from gymnax.environments import environment

    step6 = environment.Environment.step
    if getattr(step6, "_five_value_adapter", False):
        return

    def step(self, key, state, action, params=None):
        out = step6(self, key, state, action, params)
        if len(out) == 5:  # gymnax 0.0.x: already the old signature
            return out
        obs, state, reward, terminated, truncated, info = out
        return obs, state, reward, jnp.logical_or(terminated, truncated), info

    step._five_value_adapter = True
    environment.Environment.step = step


def serialize_batched_orthogonal() -> None:
    """Under vmap, run flax's orthogonal initializer once per seed instead of as one batched QR.

    Their networks use `flax.linen.initializers.orthogonal`, which takes the QR of a Gaussian
    matrix. `jax.vmap(train)` batches that QR over seeds, and jaxlib 0.10.2's CPU LAPACK kernels
    split a batch over the same thread pool that runs the program and block waiting for it; with
    2 cores both pool threads end up waiting and the program never finishes (seen here with
    --seeds 2: all threads parked in jax::ParallelBatchMap). The replacement gives the same
    values (same initializer, same keys); only the batched case changes, into a `lax.map` over
    the seeds, which runs at init only, not in the timed loop's steady state.
    """
    import jax
    from flax.linen import initializers

    original = initializers.orthogonal
    if getattr(original, "_serialized_under_vmap", False):
        return

    def orthogonal(*args, **kwargs):
        init = original(*args, **kwargs)

        def serialized_init(key, shape, dtype=None):
            call = (lambda k: init(k, shape)) if dtype is None else (lambda k: init(k, shape, dtype))
            per_key = jax.custom_batching.custom_vmap(call)

            @per_key.def_vmap
            def _rule(axis_size, in_batched, k):
                if not in_batched[0]:
                    return per_key(k), False
                return jax.lax.map(per_key, k), True

            return per_key(key)

        return serialized_init

    orthogonal._serialized_under_vmap = True
    initializers.orthogonal = orthogonal


def git_commit(path: Path):
    try:
        proc = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], check=False, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        sys.exit(fail(message))


def main() -> int:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--purejaxrl-dir", required=True, help="a checkout of luchris429/purejaxrl")
    parser.add_argument("--seeds", type=int, default=1, help="agents trained at once (vmap)")
    parser.add_argument("--total-timesteps", type=float, default=5e5, help="env steps per agent")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the compiled program")
    parser.add_argument("--paired-kl-rl", action="store_true", help="also time kl_rl, in turns with PureJaxRL")
    parser.add_argument("--env", default="CartPole-v1", help="gymnax env PureJaxRL trains on")
    parser.add_argument("--kl-rl-env", default="CartPole-v1", help="kl_rl's env id in --paired-kl-rl")
    parser.add_argument(
        "--kl-rl-batching", default="default",
        help="kl_rl's batchings in --paired-kl-rl, comma-separated: map, vmap or default (the platform's)",
    )  # fmt: skip
    args = parser.parse_args()
    if not math.isfinite(args.total_timesteps):
        return fail("--total-timesteps must be a finite number")
    if args.seeds < 1 or args.repeats < 1:
        return fail("--seeds and --repeats must be at least 1")

    root = Path(args.purejaxrl_dir)
    ppo_file = root / "purejaxrl" / "ppo.py"
    if not ppo_file.is_file():
        return fail(f"no purejaxrl/ppo.py under {args.purejaxrl_dir!r}; clone luchris429/purejaxrl there")

    main_config = read_main_config(ppo_file)
    config = dict(main_config if main_config is not None else FALLBACK_CONFIG)
    config["DEBUG"] = False
    config["TOTAL_TIMESTEPS"] = args.total_timesteps
    config["ENV_NAME"] = args.env
    if "MinAtar" in args.env:  # PureJaxRL's MinAtar settings (examples/brax_minatar.ipynb)
        config.update(LR=5e-3, NUM_ENVS=64, NUM_MINIBATCHES=8, ACTIVATION="relu")
    batch = config["NUM_ENVS"] * config["NUM_STEPS"]
    num_updates = int(args.total_timesteps) // batch
    if num_updates < 1:
        return fail(f"--total-timesteps must be at least NUM_ENVS * NUM_STEPS = {batch}")

    stub_unused_modules()
    sys.path.insert(0, str(ppo_file.parent))
    repo = Path(__file__).resolve().parents[2]
    if args.paired_kl_rl:
        # kl_rl spreads its seeds over one CPU device per core, set before JAX starts, as its
        # CLI does; PureJaxRL's program runs on the first device, as it would alone.
        sys.path[:0] = [str(repo), str(repo / "experiments")]
        try:
            from kl_rl import parallel
        except ImportError as exc:
            return fail(f"cannot import kl_rl here ({exc}); install its dependencies in this venv")
        parallel.use_cpu_devices()
    try:
        import jax
        import numpy as np

        adapt_gymnax_step()
        serialize_batched_orthogonal()
        from ppo import make_train
    except ImportError as exc:
        return fail(f"cannot import PureJaxRL's ppo.py ({exc}); run this with the anchor venv's python")

    train = make_train(config)
    if args.seeds == 1:
        keys = jax.random.PRNGKey(30)  # the key their __main__ uses
        fn = jax.jit(train)
    else:
        keys = jax.random.split(jax.random.PRNGKey(30), args.seeds)
        fn = jax.jit(jax.vmap(train))

    start = time.perf_counter()
    compiled = fn.lower(keys).compile()
    compile_s = time.perf_counter() - start

    def run_purejaxrl():
        return jax.block_until_ready(compiled(keys))

    if args.paired_kl_rl:
        import throughput

        steps = int(args.total_timesteps)
        batchings = [None if b == "default" else b for b in args.kl_rl_batching.split(",")]
        kl_rl = {b: throughput.compile_kl_rl(args.seeds, steps, args.kl_rl_env, b) for b in batchings}
        # One untimed run of each first, so none pays for first-call work inside the pairs.
        kl_outs = {b: run() for b, (run, _, _) in kl_rl.items()}
        run_purejaxrl()
    run_s = []
    kl_run_s = {b: [] for b in kl_rl} if args.paired_kl_rl else {}
    runners = [(run_purejaxrl, run_s)] + [(kl_rl[b][0], kl_run_s[b]) for b in kl_run_s]
    for i in range(args.repeats):
        # Rotated and, every other turn, reversed: each program runs before and after each other.
        turn = runners[i % len(runners) :] + runners[: i % len(runners)]
        for fn_, times in turn if i % 2 == 0 else turn[::-1]:
            start = time.perf_counter()
            result = fn_()
            times.append(time.perf_counter() - start)
            if fn_ is run_purejaxrl:
                out = result

    # Mean return of the episodes that ended during the last update, per seed, then over seeds.
    metrics = out["metrics"]
    ended = np.asarray(metrics["returned_episode"]).reshape(args.seeds, num_updates, -1)[:, -1]
    returns = np.asarray(metrics["returned_episode_returns"]).reshape(args.seeds, num_updates, -1)[:, -1]
    per_seed = [float(returns[s][ended[s]].mean()) for s in range(args.seeds) if ended[s].any()]

    total = int(args.total_timesteps)
    print(
        json.dumps(
            {
                "impl": "purejaxrl",
                "env": args.env,
                "seeds": args.seeds,
                "total_timesteps": total,
                "compile_s": round(compile_s, 3),
                "run_s": [round(t, 3) for t in run_s],
                "env_steps_per_s": round(statistics.median(args.seeds * total / t for t in run_s)),
                "final_return_mean": round(float(np.mean(per_seed)), 2) if per_seed else None,
                "jax": jax.__version__,
                "device": str(jax.devices()[0]),
                "config_source": "ppo.py __main__" if main_config is not None else "fallback defaults",
                "purejaxrl_commit": git_commit(root),
            }
        )
    )
    for b, times in kl_run_s.items():
        _, compile_s, kl_steps = kl_rl[b]
        summary = paired_summary(run_s, times, compile_s, kl_steps, kl_outs[b], args.seeds * total)
        print(json.dumps({**summary, "batching": b or "default", "seeds": args.seeds}))
    if len(kl_run_s) > 1:
        first, *others = kl_run_s
        ratios = {
            f"{b or 'default'}_over_{first or 'default'}": _median_ci([t0 / t for t0, t in
                                                                       zip(kl_run_s[first], kl_run_s[b], strict=True)])
            for b in others
        }  # fmt: skip
        print(json.dumps({"seeds": args.seeds, **ratios}))
    return 0


def _median_ci(ratios: list) -> dict:
    """The median of paired ratios and a 95% percentile-bootstrap interval of it."""
    import numpy as np

    ratios = np.asarray(ratios)
    rng = np.random.default_rng(0)
    low, high = np.percentile(np.median(rng.choice(ratios, (10_000, ratios.size)), axis=1), [2.5, 97.5])
    return {"paired_ratios": [round(float(r), 3) for r in ratios], "median": round(float(np.median(ratios)), 3),
            "ci95": [round(float(low), 3), round(float(high), 3)]}  # fmt: skip


def paired_summary(theirs: list, ours: list, compile_s: float, steps: int, out, their_steps: int) -> dict:
    """kl_rl's times and the per-pair ratios of env steps/s, with a bootstrap interval of their median."""
    import numpy as np

    ratios = _median_ci([(steps / o) / (their_steps / t) for o, t in zip(ours, theirs, strict=True)])
    return {
        "impl": "kl_rl",
        "env_steps": steps,
        "compile_s": round(compile_s, 3),
        "run_s": [round(t, 3) for t in ours],
        "env_steps_per_s": round(statistics.median(steps / t for t in ours)),
        "final_return_median": float(np.median(np.asarray(out.eval_returns).mean(axis=-1))),
        "paired_ratios": ratios["paired_ratios"],
        "kl_rl_over_purejaxrl_median": ratios["median"],
        "ci95": ratios["ci95"],
    }

if __name__ == "__main__":
    sys.exit(main())
