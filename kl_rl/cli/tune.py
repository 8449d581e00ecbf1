"""`kl-rl tune`: hyperparameter search with Optuna, several workers sharing one study."""

from typing import Any

from kl_rl.cli.common import Diverged, add_flags, device_count, out_dir, run_overrides, run_parser, source_args
from kl_rl.cli.progress import Bar
from kl_rl.errors import ConfigError

USAGE = (
    "usage: kl-rl tune --algo ALGO --env ENV --space NAME=LOW:HIGH NAME=log:LOW:HIGH NAME=V1,V2 ... "
    "[--trials N] [--batch-size N] [--seeds N] [--total-steps N] [--rungs N] [--storage URL|journal:PATH] "
    "[--study-name NAME] [--sampler-seed N] [--startup-trials N] [--out DIR] [--config FILE] [--batching map|vmap] "
    "[--wandb PROJECT] [--no-progress] [--<hyperparameter> VALUE ...]"
)

HELP = """
Searches hyperparameters with Optuna (TPE sampler, median pruner) on seeds 0..N-1 per trial.
A trial's value is the mean over seeds of its final evaluation return (train's final_return).

  --space         NAME=LOW:HIGH (uniform; integers for int fields), NAME=log:LOW:HIGH (log-uniform)
                  or NAME=V1,V2,... (categorical; tuple fields as hidden_sizes=64:64,32:32)
  --trials        trials this worker runs (default 20)
  --batch-size    trials per batch, run as one vmapped program per static group (default 8)
  --rungs         training segments, each followed by a pruning check (default 4)
  --storage       Optuna database URL, or journal:PATH for a journal file (on a filesystem every
                  host mounts, with no database server); workers given the same storage and
                  --study-name share the study (default: sqlite:///<OUT>.study.db next to the
                  output folder)
  --study-name    default: the output folder's name
  --sampler-seed  default: a fresh seed, printed, so workers sharing a study draw different trials
  --startup-trials  random trials before TPE, and finished trials before pruning (default 10)
  --batching      map or vmap: how a device runs its (trial, seed) pairs (kl-rl --help)
  --wandb         a W&B project: each trial that trained is a group of runs, one per seed (kl-rl --help)

Writes config.json (space and base config), metrics.csv (one row per trial of this worker) and
summary.json (the study's best trial, counts by state, this worker's trials)."""


def main(argv: list[str]) -> int:
    """`kl-rl tune ...`: bad input raises ConfigError, which `kl_rl.cli.main` prints as one line."""
    import numpy as np

    from kl_rl import config as config_lib
    from kl_rl import distributed, logging_wandb, parallel, resolve, tune

    parser = run_parser("kl-rl tune", "Hyperparameter search with Optuna.", seeds_default="4")
    parser.add_argument("--space", nargs="+", default=[], metavar="NAME=SPEC")
    add_flags(parser, trials="20", batch_size="8", rungs="4", startup_trials="10")
    add_flags(parser, storage=None, study_name=None, sampler_seed=None)
    args, extra = parser.parse_known_args(argv)
    if args.help:
        print(USAGE + "\n" + HELP)
        return 0
    optuna = tune.require_optuna()
    if not args.space:
        raise ConfigError(f"--space needs at least one item: {tune.SPACE_FORMS}")
    counts = {
        name: config_lib.parse_value(name, getattr(args, name), int)
        for name in ("seeds", "trials", "batch_size", "rungs", "startup_trials")
    }
    if counts["startup_trials"] < 0:
        raise ConfigError(f"--startup-trials must be 0 or more, got {counts['startup_trials']}")
    parallel.check_batching(args.batching)
    if args.sampler_seed is None:
        sampler_seed = int(np.random.default_rng().integers(2**31))
    else:
        sampler_seed = config_lib.parse_value("sampler_seed", args.sampler_seed, int)
    overrides = run_overrides(args, extra)
    space = tune.parse_space(args.algo, args.space)
    resolve.resolve_config(args.algo, args.env, args.config, overrides, args.env_path)
    out = out_dir(args, prefix="tune-")
    if args.wandb is not None:
        logging_wandb.check(args.wandb)
    storage = args.storage
    if storage is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{out.parent.resolve() / (out.name + '.study.db')}"
    study_name = args.study_name or out.name
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the batch lines below say what matters
    print(
        f"tune {args.algo} on {args.env}: {counts['trials']} trial(s) in batches of {counts['batch_size']} "
        f"x {counts['seeds']} seed(s); study {study_name!r} in {tune.redact(storage)} (sampler seed {sampler_seed})",
        flush=True,
    )
    with Bar(f"tune {args.algo} {args.env}", enabled=not args.no_progress) as bar:
        result = tune.run_tune(
            args.algo, args.env, space, counts["trials"], counts["batch_size"], counts["seeds"], storage, study_name,
            args.config, overrides, rungs=counts["rungs"], sampler_seed=sampler_seed,
            startup_trials=counts["startup_trials"], log=bar.log, progress=bar, env_path=args.env_path,
            vectorization=args.vectorization, devices=device_count(args.devices), batching=args.batching,
            **source_args(args),
        )  # fmt: skip
    print(f"storage {tune.redact(storage)}, study {study_name!r}")
    _print_top(result)
    if distributed.is_main():  # of several processes, process 0 holds the study and writes the folder
        result.save(out)
        if args.wandb is not None:
            logging_wandb.log_tune(result, args.wandb, folder=out.name)
            print(f"logged {len(result.metrics)} trial(s) to W&B project {args.wandb!r}, groups {out.name}-trial<N>")
    print(f"tune folder: {out}")
    diverged = result.diverged_items()
    if diverged:
        first = diverged[0]
        trials = len({d["trial"] for d in diverged})
        raise Diverged(
            f"trial {first['trial']} diverged: seed {first['seed']} at update {first['update']} (non-finite values); "
            f"{trials} of {len(result.trials)} trial(s) diverged and were told FAIL; the tune folder {out} records them"
        )
    return 0


def _print_top(result, top: int = 5) -> None:
    """The study's best `top` complete trials (this worker's marked *) and the best params as flags.

    Args:
      result: a `kl_rl.tune.TuneResult`.
      top: rows to print.
    """
    from kl_rl import tune

    names = list(result.space)
    counts = ", ".join(f"{n} {s.lower()}" for s, n in result.study_counts.items())
    print(f"\nstudy {result.study_name!r}: {counts}; this worker ran {len(result.trials)} trial(s) (marked *)")
    if result.best is None:
        print("no trial of the study has completed yet")
        return
    mine = {t["number"] for t in result.trials}
    print(f"{'rank':>4} {'trial':>7} {'value':>9} " + " ".join(f"{n:>14}" for n in names))
    for rank, t in enumerate(result.top[:top], 1):
        number = f"{t['number']}{'*' if t['number'] in mine else ' '}"
        values = " ".join(f"{_short(t['params'].get(n)):>14}" for n in names)
        print(f"{rank:>4} {number:>7} {t['value']:>9.2f} {values}")
    best = tune.to_overrides(result.algo, result.best["params"])
    flags = " ".join(f"--{n.replace('_', '-')} {v}" for n, v in best.items())
    print(f"best: trial {result.best['number']}, value {result.best['value']:.2f}: {flags}")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
