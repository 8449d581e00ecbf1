"""The `kl-rl` command line.

    kl-rl train --algo ppo --env CartPole-v1 [--seeds N] [--total-steps N] [--out DIR]
                [--config FILE] [--checkpoint-every UPDATES] [--tensorboard] [--<hyperparameter> VALUE ...]
                [--env-path auto|jax|host] [--vectorization sync|async]
    kl-rl train --resume DIR
    kl-rl sweep --algo ppo --env CartPole-v1 --grid lr=3e-4,1e-3 clip_eps=0.1,0.2 [--seeds N]
                [--out DIR] [--total-steps N] [--config FILE] [--chunk-size N] [--no-progress]
                [--<hyperparameter> VALUE ...]
    kl-rl tune --algo ppo --env CartPole-v1 --space lr=log:1e-5:1e-2 clip_eps=0.1:0.3 [--trials N]
               [--batch-size N] [--seeds N] [--rungs N] [--storage URL] [--study-name NAME] [--out DIR]
    kl-rl plot RUN_OR_SWEEP_DIR... [--out DIR]
    kl-rl list

--env takes a JAX port (kl-rl list) or any gymnasium id, e.g. HalfCheetah-v5 with the mujoco
extra; an id with no port runs on the host-side path (gymnasium.make_vec, stepped from inside the
compiled program), sync or async across processes. --env-path host forces it for a ported id.

Bad input is one line on stderr and exit code 2; an existing run folder is only replaced once a
run has succeeded.
"""

import argparse
import dataclasses
import datetime
import json
import sys
from typing import NoReturn

from kl_rl.errors import ConfigError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit 2 without the usage dump."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see kl-rl {self.prog.split()[-1]} --help)")


def _overrides(extra: list[str]) -> dict[str, str]:
    """Turns ['--lr', '3e-4', '--clip-eps=0.1'] into {'lr': '3e-4', 'clip_eps': '0.1'}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}; hyperparameters are given as --name VALUE")
        name, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise ConfigError(f"--{name} needs a value")
            value = extra[i + 1]
            i += 1
        out[name.replace("-", "_")] = value
        i += 1
    return out


def _train_help(algo: str) -> str:
    from kl_rl import config as config_lib
    from kl_rl.agents import algo_spec

    cls = algo_spec(algo).config
    docs = config_lib.field_docs(cls)
    lines = [f"hyperparameters of --algo {algo} (static ones change the compiled program's shapes):"]
    for f in dataclasses.fields(cls):
        kind = "static" if config_lib.is_static(cls, f.name) else "traced"
        lines.append(f"  --{f.name.replace('_', '-'):<22} {kind:<6} default {f.default!r}: {docs.get(f.name, '')}")
    return "\n".join(lines)


def _print_table(result) -> None:
    import numpy as np

    final = result.final_returns
    last_train = result.metrics["episode_return"][:, -1]
    print(f"\n{result.algo} on {result.env_id}: {len(result.seeds)} seed(s) x {result.total_env_steps:,} env steps")
    print(f"{'seed':>6} {'final_return':>13} {'train_return':>13} {'kl':>10} {'entropy':>9}")
    for i, seed in enumerate(result.seeds):
        print(
            f"{seed:>6} {final[i]:>13.2f} {last_train[i]:>13.2f} "
            f"{result.metrics['kl'][i, -1]:>10.5f} {result.metrics['entropy'][i, -1]:>9.4f}"
        )
    summary = result.summary()
    print(
        f"{'median':>6} {np.median(final):>13.2f}   IQM {summary['final_return_iqm']:.2f}   "
        f"wall {result.wall_time_s:.1f}s   compile {result.compile_time_s:.1f}s   "
        f"{result.env_steps_per_s:,.0f} env steps/s"
    )
    if result.env_time_s is not None:
        share = result.env_time_s / result.wall_time_s
        print(f"host-side envs ({result.vectorization}): {result.env_time_s:.1f}s stepping, {share:.0%} of wall time")


def _run_parser(prog: str, description: str, seeds_default: str) -> _Parser:
    """The arguments `train` and `sweep` share; hyperparameters go through `_run_overrides`."""
    parser = _Parser(prog=prog, add_help=False, description=description)
    parser.add_argument("--algo", default="ppo")
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--env-path", default="auto")
    parser.add_argument("--vectorization", default="sync")
    parser.add_argument("--seeds", default=seeds_default)
    parser.add_argument("--total-steps", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--config", default=None)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("-h", "--help", action="store_true")
    return parser


def _run_overrides(args: argparse.Namespace, extra: list[str]) -> dict[str, str]:
    """--<hyperparameter> flags plus --total-steps, which iteration-counted algos (cem) refuse."""
    from kl_rl.agents import algo_spec

    overrides = _overrides(extra)
    if args.total_steps is not None:
        if "total_steps" not in {f.name for f in dataclasses.fields(algo_spec(args.algo).config)}:
            raise ConfigError(
                f"--total-steps does not apply to {args.algo}, which counts iterations; use --iterations N"
            )
        overrides["total_steps"] = args.total_steps
    return overrides


def _out_dir(args: argparse.Namespace, prefix: str):
    """--out, or runs/<prefix><algo>-<env>-<time>; a path that is a file is a ConfigError."""
    from pathlib import Path

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    env_name = args.env.replace("/", "_").replace(":", "_")  # "ALE/Pong-v5", "module:Id"
    out = Path(args.out) if args.out else Path("runs") / f"{prefix}{args.algo}-{env_name}-{stamp}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a folder; choose another path")
    return out


def _train(argv: list[str]) -> int:
    from kl_rl import config as config_lib
    from kl_rl import envs, runner

    parser = _run_parser("kl-rl train", "Train an agent on seeds 0..N-1.", seeds_default="1")
    parser.add_argument("--checkpoint-every", default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--tensorboard", action="store_true")
    args, extra = parser.parse_known_args(argv)
    if args.help:
        print(
            "usage: kl-rl train --algo ALGO --env ENV [--seeds N] [--total-steps N] [--out DIR] "
            "[--config FILE.yaml|.toml] [--checkpoint-every UPDATES] [--tensorboard] [--no-progress] "
            "[--<hyperparameter> VALUE ...]\n"
            "       kl-rl train --resume DIR [--tensorboard] [--no-progress]\n"
        )
        print(_train_help(args.algo))
        return 0
    if args.resume is not None:
        return _resume(args, extra, argv)
    seeds = config_lib.parse_value("seeds", args.seeds, int)
    if seeds <= 0:
        raise ConfigError(f"--seeds must be a positive integer, got {seeds}")
    every = config_lib.parse_value("checkpoint_every", args.checkpoint_every or 0, int)
    if every < 0:
        raise ConfigError(f"--checkpoint-every must be a non-negative number of updates, got {every}")
    overrides = _run_overrides(args, extra)
    config = runner.resolve_config(args.algo, args.env, args.config, overrides, args.env_path)
    env_path = envs.resolve_path(args.env, args.env_path)
    out = _out_dir(args, prefix="")
    if args.tensorboard:
        runner.require_tensorboard()
    checkpoint_dir = None
    if every:
        # Checkpoints go into the run folder while it trains, so it must not hold another run.
        if out.exists() and any(out.iterdir()):
            raise ConfigError(
                f"--out {str(out)!r} already holds files; --checkpoint-every needs a new or empty folder "
                "(continue a run with kl-rl train --resume DIR)"
            )
        out.mkdir(parents=True, exist_ok=True)
        checkpoint_dir = out
        run_config = runner.run_config(
            args.algo, args.env, list(range(seeds)), config, every, env_path, args.vectorization
        )
        (out / "config.json").write_text(json.dumps(run_config, indent=2) + "\n")
    where = "" if env_path == "jax" else f" (host-side gymnasium envs, {args.vectorization})"
    print(f"compiling {args.algo} on {args.env}{where} for {seeds} seed(s)...", flush=True)
    return _run_and_save(
        args, args.algo, args.env, seeds, config, out, checkpoint_dir, every, env_path, args.vectorization
    )


def _run_and_save(args, algo, env, seeds, config, out, checkpoint_dir, every, env_path, vectorization) -> int:
    """What a new run and a resumed one share: train, print the table, write the run folder."""
    from kl_rl import runner

    result = runner.run(
        algo, env, seeds=seeds, config=config, progress=not args.no_progress,
        checkpoint_dir=checkpoint_dir, checkpoint_every=every, env_path=env_path, vectorization=vectorization,
    )  # fmt: skip
    _print_table(result)
    result.save(out, checkpoint_every=every, tensorboard=args.tensorboard)
    print(f"run folder: {out}")
    return 0


def _resume(args: argparse.Namespace, extra: list[str], argv: list[str]) -> int:
    """kl-rl train --resume DIR: continues a checkpointed run from its newest checkpoint."""
    from pathlib import Path

    from kl_rl import runner

    run_dir = Path(args.resume)
    spec = runner.read_run_config(run_dir)
    algo, env, seeds, config, every = spec.algo, spec.env, spec.seeds, spec.config, spec.checkpoint_every
    given = {"--algo": (args.algo, algo), "--env": (args.env, env)}
    for flag, (value, saved) in given.items():
        if (flag in argv or any(a.startswith(flag + "=") for a in argv)) and value != saved:
            raise ConfigError(
                f"--resume {str(run_dir)!r} holds a {algo} run on {env}, not {flag} {value}; "
                "resume it as it is, or start a new run with --out"
            )
    changed = any(flag in argv or any(a.startswith(flag + "=") for a in argv) for flag in _RUN_FLAGS)
    if extra or args.config or args.total_steps or args.out or args.checkpoint_every or changed:
        raise ConfigError(
            "--resume continues a run exactly as configured; give no other settings than --no-progress, --tensorboard"
        )
    if (run_dir / "summary.json").exists():
        raise ConfigError(f"the run in {str(run_dir)!r} has already finished; there is nothing to resume")
    if args.tensorboard:
        runner.require_tensorboard()
    from kl_rl.checkpoint import Checkpointer

    ckpt = Checkpointer(run_dir, read_only=True)
    latest = ckpt.latest() or 0
    ckpt.close()
    print(
        f"resuming {algo} on {env} for {len(seeds)} seed(s) in {run_dir} "
        f"from update {latest} of {config.num_updates}...",
        flush=True,
    )
    return _run_and_save(
        args, algo, env, len(seeds), config, run_dir, run_dir, every, spec.env_path, spec.vectorization
    )


_RUN_FLAGS = ("--seeds", "--env-path", "--vectorization")
"""Flags that --resume refuses: they are the run's, read from its folder."""


def _sweep(argv: list[str]) -> int:
    from kl_rl import config as config_lib
    from kl_rl import envs, runner, sweep

    parser = _run_parser("kl-rl sweep", "A grid of hyperparameters x seeds.", seeds_default="4")
    parser.add_argument("--grid", nargs="+", default=[], metavar="NAME=V1,V2")
    parser.add_argument("--chunk-size", default="64")
    args, extra = parser.parse_known_args(argv)
    if args.help:
        print(__doc__.strip())
        print(
            "\nTraced hyperparameters of the grid share one compiled program; static ones (marked in\n"
            "kl-rl train --algo ALGO --help) make one program per value. Writes metrics.csv (one row per\n"
            "grid point, seed and update), summary.json (points ranked by IQM of final return, 95% CI)."
        )
        return 0
    if not args.grid:
        raise ConfigError("--grid needs at least one NAME=V1,V2,... item")
    seeds = config_lib.parse_value("seeds", args.seeds, int)
    chunk_size = config_lib.parse_value("chunk_size", args.chunk_size, int)
    overrides = _run_overrides(args, extra)
    grid = sweep.parse_grid(args.algo, args.grid)
    base = runner.resolve_config(args.algo, args.env, args.config, overrides, args.env_path)
    out = _out_dir(args, prefix="sweep-")
    points = len(sweep.expand(grid))
    print(f"sweep of {args.algo} on {args.env}: {points} grid point(s) x {seeds} seed(s)", flush=True)
    result = sweep.run_sweep(
        args.algo, args.env, grid, seeds, args.config, overrides, chunk_size,
        log=lambda line: print(line, flush=True), progress=not args.no_progress,
        env_path=args.env_path, vectorization=args.vectorization,
    )  # fmt: skip
    print(f"compiled {len(result.programs)} program(s) for {points} grid point(s)")
    ranking = result.ranking()
    names = list(grid)
    print("rank " + " ".join(f"{n:>14}" for n in names) + "   IQM final_return  95% CI")
    for rank, row in enumerate(ranking, 1):
        lo, hi = row["iqm_ci95"]
        values = " ".join(f"{row[n]!s:>14}" for n in names)
        print(f"{rank:>4} {values}   {row['final_return_iqm']:>16.2f}  [{lo:.2f}, {hi:.2f}]")
    env_path = envs.resolve_path(args.env, args.env_path)
    run = {"algo": args.algo, "env": args.env, "seeds": seeds, "env_path": env_path}
    if env_path == "host":
        run["vectorization"] = args.vectorization
    result.save(out, {**run, **config_lib.to_dict(base)})
    print(f"sweep folder: {out}")
    return 0


def _list(argv: list[str]) -> int:
    from kl_rl import envs
    from kl_rl.agents import ALGOS
    from kl_rl.presets import PRESETS

    if argv:
        raise ConfigError(f"kl-rl list takes no arguments, got {' '.join(argv)!r}")
    print("algos:   " + ", ".join(sorted(ALGOS)))
    print("envs:    " + ", ".join(envs.ENV_IDS) + " (JAX ports); any other gymnasium id runs host-side")
    print("presets: " + ", ".join(f"{a}/{e}" for a, e in sorted(PRESETS)))
    return 0


def _tune(argv: list[str]) -> int:
    from kl_rl import tune

    return tune.cli_main(argv)


def _plot(argv: list[str]) -> int:
    try:
        from kl_rl import plots
    except ImportError as err:
        raise ConfigError(f"kl-rl plot needs {err.name}; install it with pip install 'kl_rl[analysis]'") from None
    return plots.cli_main(argv)


COMMANDS = {"train": _train, "sweep": _sweep, "tune": _tune, "plot": _plot, "list": _list}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `kl-rl` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    try:
        if command not in COMMANDS:
            raise ConfigError(f"unknown command {command!r}; use one of {', '.join(COMMANDS)}")
        return COMMANDS[command](rest)
    except ConfigError as err:
        print(f"kl-rl: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kl-rl: interrupted; no run folder was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
