"""Argument handling the commands share: one-line parse errors, hyperparameter flags, output folders."""

import argparse
import dataclasses
import datetime
from pathlib import Path
from typing import NoReturn

from kl_rl.errors import ConfigError


class Diverged(Exception):
    """A run that went non-finite (inf or nan): `kl_rl.cli.main` prints it as one line, exit code 3."""


class Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit 2 without the usage dump."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see kl-rl {self.prog.split()[-1]} --help)")


def parse_overrides(extra: list[str]) -> dict[str, str]:
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


def run_parser(prog: str, description: str, seeds_default: str) -> Parser:
    """The arguments `train`, `sweep` and `tune` share; hyperparameters go through `run_overrides`."""
    parser = Parser(prog=prog, add_help=False, description=description)
    add_flags(parser, algo="ppo", env="CartPole-v1", env_path="auto", vectorization="sync", seeds=seeds_default)
    add_flags(parser, total_steps=None, out=None, config=None, devices=None, batching=None)
    add_flags(parser, reference=None, reference_seed=None, init_from=None)
    add_flags(parser, wandb=None)  # --wandb PROJECT (`kl_rl.logging_wandb`)
    parser.add_argument("--no-progress", action="store_true")
    # Read by `join_processes` before JAX starts; declared so that they are not hyperparameters.
    add_flags(parser, coordinator=None, num_processes=None, process_id=None)
    parser.add_argument("-h", "--help", action="store_true")
    return parser


def add_flags(parser: argparse.ArgumentParser, **defaults: str | None) -> None:
    """A `--name-with-dashes TEXT` flag for each keyword, its value kept as text until parsed."""
    for name, default in defaults.items():
        parser.add_argument("--" + name.replace("_", "-"), default=default)


def source_args(args: argparse.Namespace) -> dict:
    """--reference, --reference-seed and --init-from as `kl_rl.sources.resolve_sources` takes them."""
    from kl_rl import config as config_lib

    seed = None if args.reference_seed is None else config_lib.parse_value("reference_seed", args.reference_seed, int)
    return {"reference": args.reference, "reference_seed": seed, "init_from": args.init_from}


def device_count(text: str | None) -> int | None:
    """--devices N as a positive int, or None (every local device)."""
    from kl_rl import config as config_lib

    if text is None:
        return None
    count = config_lib.parse_value("devices", text, int)
    if count <= 0:
        raise ConfigError(f"--devices must be a positive integer, got {count}")
    return count


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value of `flag` in `argv` (`--flag V` or `--flag=V`, the last one given), or None."""
    value = None
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(flag + "="):
            value = token.partition("=")[2]
    return value


def expose_cpu_devices(argv: list[str]) -> None:
    """Before JAX starts: one CPU device per core, or --devices N (a user's XLA_FLAGS win)."""
    from kl_rl import parallel

    parallel.use_cpu_devices(device_count(flag_value(argv, "--devices")))


EXIT_LOST = 4
"""The exit code of a process whose run lost another process (or never saw them all join)."""


def lost(message: str) -> NoReturn:
    """Prints one line and ends this process at once: JAX's own exit would wait for (or abort
    with a stack dump over) the processes that are gone."""
    import os
    import sys

    sys.stdout.flush()
    print(f"kl-rl: error: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_LOST)


def join_processes(argv: list[str]) -> bool:
    """Before JAX starts: --coordinator HOST:PORT, --num-processes N and --process-id I join the
    run's other processes (`kl_rl.distributed.join`; none of them: only in a SLURM step or Open
    MPI job of several tasks). A process that has not seen every other join within
    `kl_rl.distributed.join_timeout()` stops with one line.

    Returns:
      Whether this process joined others.
    """
    import threading

    from kl_rl import config as config_lib
    from kl_rl import distributed

    coordinator = flag_value(argv, "--coordinator")
    count, index = flag_value(argv, "--num-processes"), flag_value(argv, "--process-id")
    count = None if count is None else config_lib.parse_value("num_processes", count, int)
    index = None if index is None else config_lib.parse_value("process_id", index, int)
    distributed.check(coordinator, count, index)
    if coordinator is None and not distributed.cluster_detected():
        return False
    timeout = distributed.join_timeout()
    where = f" at {coordinator}" if coordinator else ""
    watchdog = threading.Timer(timeout, lost, [f"not all {count or 'the'} processes joined{where} within {timeout} s; "
                                               "start every process of the run with the same --coordinator"])
    watchdog.daemon = True
    watchdog.start()
    try:  # JAX's own deadline comes later: it ends the process with a stack dump, not a line
        return distributed.join(coordinator, count, index, timeout_s=timeout)
    finally:
        watchdog.cancel()


def run_overrides(args: argparse.Namespace, extra: list[str]) -> dict[str, str]:
    """--<hyperparameter> flags plus --total-steps, which iteration-counted algos (cem) refuse."""
    from kl_rl.agents import algo_spec

    overrides = parse_overrides(extra)
    if args.total_steps is not None:
        if "total_steps" not in {f.name for f in dataclasses.fields(algo_spec(args.algo).config)}:
            raise ConfigError(
                f"--total-steps does not apply to {args.algo}, which counts iterations; use --iterations N"
            )
        overrides["total_steps"] = args.total_steps
    return overrides


def out_dir(args: argparse.Namespace, prefix: str) -> Path:
    """--out, or runs/<prefix><algo>-<env>-<time>; a path that is a file is a ConfigError."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    env_name = args.env.replace("/", "_").replace(":", "_")  # "ALE/Pong-v5", "module:Id"
    out = Path(args.out) if args.out else Path("runs") / f"{prefix}{args.algo}-{env_name}-{stamp}"
    check_out(out)
    return out


def check_out(out: Path) -> None:
    """Raises a ConfigError if the output folder `out` is an existing file."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a folder; choose another path")
