"""The `kl-rl` command line.

    kl-rl train --algo ppo --env CartPole-v1 [--seeds N] [--total-steps N] [--out DIR]
                [--config FILE] [--checkpoint-every UPDATES] [--tensorboard] [--wandb PROJECT]
                [--<hyperparameter> VALUE ...] [--env-path auto|jax|host] [--vectorization sync|async]
    kl-rl train --resume DIR
    kl-rl sweep --algo ppo --env CartPole-v1 --grid lr=3e-4,1e-3 clip_eps=0.1,0.2 [--seeds N]
                [--out DIR] [--total-steps N] [--config FILE] [--chunk-size N] [--no-progress]
                [--<hyperparameter> VALUE ...]
    kl-rl tune --algo ppo --env CartPole-v1 --space lr=log:1e-5:1e-2 clip_eps=0.1:0.3 [--trials N]
               [--batch-size N] [--seeds N] [--rungs N] [--storage URL|journal:PATH] [--study-name NAME] [--out DIR]
    kl-rl eval RUN_DIR [--episodes N] [--stochastic] [--seeds S,S,...] [--update U] [--env.NAME VALUE ...]
    kl-rl plot RUN_OR_SWEEP_DIR... [--out DIR]
    kl-rl compare RUN_DIR... [--by algo|run] [--eval NAME]
    kl-rl play RUN_DIR --video FILE.mp4|FILE.gif [--seed S] [--episodes N] [--fps F] [--stochastic]
    kl-rl list

train, sweep and tune spread their runs over every local device; on CPU one device per core,
set before JAX starts (--devices N for another count; a device count in XLA_FLAGS wins).
--batching map|vmap says how one device runs its share: map (the default on CPU) one run after
another, so a run's bits depend only on its seed and config; vmap (the default on GPU/TPU) as one
batch, faster, but a run's bits may then depend on the runs beside it.

Several processes, on one host or many, run one train or sweep together: start the same command
in each with --coordinator HOST:PORT (process 0's address) --num-processes N --process-id I (in
a SLURM step or Open MPI job of several tasks, none of the three is needed). Their items spread
over every process's devices, process 0 alone prints and writes the run folder, and a process
that loses another stops within a minute with one line, exit code 4.

--env takes a JAX port (kl-rl list) or any gymnasium id, e.g. HalfCheetah-v5 with the mujoco
extra; an id with no port runs on the host-side path (gymnasium.make_vec, stepped from inside the
compiled program), sync or async across processes. --env-path host forces it for a ported id.

--wandb PROJECT logs train, sweep and tune to Weights & Biases (the wandb extra) once they
finish: a seed is a W&B run, grouped by run folder (a sweep's grid point or a tune trial is a
group of its own); with WANDB_MODE=offline nothing leaves the machine until wandb sync.

Bad input is one line on stderr and exit code 2; an existing run folder is only replaced once a
run has succeeded. A run that went non-finite (inf or nan) still writes its folder, then says at
which update in one line on stderr, exit code 3; so do a sweep any of whose grid points diverged
and a tune any of whose trials did (those points are not ranked, those trials are told FAIL).
"""

# Annotations stay unevaluated: importing the command module `list` binds that name in this
# package's namespace, over the builtin.
from __future__ import annotations

import sys

from kl_rl.cli import list as list_command
from kl_rl.cli import compare, play, plot, sweep, train, tune
from kl_rl.cli import eval as eval_command
from kl_rl.cli.common import Diverged, expose_cpu_devices, flag_value, join_processes, lost
from kl_rl.errors import ConfigError

EXIT_USAGE = 2
EXIT_DIVERGED = 3

COMMANDS = {"train": train.main, "sweep": sweep.main, "tune": tune.main, "plot": plot.main, "list": list_command.main,
            "eval": eval_command.main, "compare": compare.main, "play": play.main}  # fmt: skip


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
        joined = False
        if command in ("train", "sweep", "tune"):
            joined = join_processes(rest)
            expose_cpu_devices(rest)
        if not joined:
            return COMMANDS[command](rest)
        return _joined(COMMANDS[command], rest)
    except ConfigError as err:
        print(f"kl-rl: error: {err.as_flags()}", file=sys.stderr)
        return EXIT_USAGE
    except Diverged as err:
        print(f"kl-rl: error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print("kl-rl: interrupted; no run folder was written", file=sys.stderr)
        return 130


def _joined(command, argv: list[str]) -> int:
    """A command run by one of several processes: only process 0 prints (and writes the folder),
    and a process that loses the others stops at once with one line."""
    import contextlib
    import os

    import jax

    from kl_rl import distributed

    index, count = jax.process_index(), jax.process_count()
    tail = "no run folder was written"
    resume, every = flag_value(argv, "--resume"), flag_value(argv, "--checkpoint-every")
    if command is train.main and (resume or every not in (None, "0")):
        folder = resume or flag_value(argv, "--out") or "RUN_DIR"
        tail = f"continue from its last checkpoint with kl-rl train --resume {folder} in every process"
    silent = f"process {index} of {count}: {{}} of the run stopped answering; {tail}"
    done = distributed.watch(lambda who: lost(silent.format(who)))
    try:
        if distributed.is_main():
            return command(argv)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            return command(argv)
    except Diverged:
        if distributed.is_main():
            raise
        return EXIT_DIVERGED  # process 0 says which item diverged
    except jax.errors.JaxRuntimeError as err:
        # Gloo names the peer's address, not its index; of two processes, the peer is the other one.
        other = f"process {1 - index}" if count == 2 else "another process"
        reason = " ".join(str(err).split())
        lost(f"process {index} of {count} lost contact with {other} of the run "
             f"({reason[:200]}); {tail}")  # fmt: skip
    finally:
        done()
