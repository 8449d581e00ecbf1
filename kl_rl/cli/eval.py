"""`kl-rl eval RUN_DIR`: evaluates a run folder's policies again, writes eval/<name>.json."""

import math

import numpy as np

from kl_rl.cli.common import Parser, add_flags, device_count, expose_cpu_devices, parse_overrides
from kl_rl.errors import ConfigError

USAGE = """usage: kl-rl eval RUN_DIR [--episodes N] [--stochastic] [--seeds S,S,...] [--update U]
                     [--env.NAME VALUE ...] [--name NAME] [--devices N]

Evaluates the policies of a kl-rl train run folder again, every chosen seed in one compiled
program (the trainer's own evaluation, laid out over the devices as training was), prints a
table per seed with the median and IQM, and writes RUN_DIR/eval/<NAME>.json (nothing else in the
folder changes). Each seed uses its training evaluation key, so with no option the table is
summary.json's final returns, exactly.

  --episodes N        episodes per seed (default: the run's eval_episodes)
  --stochastic        sample actions (default: the distribution's mode, as training evaluates)
  --seeds S,S,...     some of the run's seeds (default: all)
  --update U          an earlier checkpoint in RUN_DIR/checkpoints/ (default: the newest)
  --env.NAME VALUE    an env param changed for the evaluation (JAX ports and env families;
                      kl-rl train --env.NAME lists them on a typo), e.g. --env.masspole 0.5
  --name NAME         the file name under eval/ (default: from the options, e.g.
                      update24-16ep-mode-masspole=0.5)"""


def main(argv: list[str]) -> int:
    """`kl-rl eval ...`: bad input raises ConfigError (one line, exit 2) before anything is written."""
    parser = Parser(prog="kl-rl eval", add_help=False)
    parser.add_argument("run_dir", nargs="?")
    add_flags(parser, episodes=None, seeds=None, update=None, name=None, devices=None)
    parser.add_argument("--stochastic", action="store_true")
    parser.add_argument("-h", "--help", action="store_true")
    args, extra = parser.parse_known_args(argv)
    if args.help:
        print(USAGE)
        return 0
    if args.run_dir is None:
        raise ConfigError("kl-rl eval needs a run folder: kl-rl eval RUN_DIR (see kl-rl eval --help)")
    env_params = {}
    for name, value in parse_overrides(extra).items():
        if not name.startswith("env."):
            raise ConfigError(f"unknown option --{name.replace('_', '-')} for kl-rl eval (see kl-rl eval --help)")
        env_params[name[len("env.") :]] = value
    expose_cpu_devices(argv)
    device_count(args.devices)
    from kl_rl import config as config_lib
    from kl_rl import runfolder

    episodes = None if args.episodes is None else config_lib.parse_value("episodes", args.episodes, int)
    update = None if args.update is None else config_lib.parse_value("update", args.update, int)
    seeds = None if args.seeds is None else _seeds(args.seeds)
    if args.name is not None:
        runfolder.check_eval_name(args.name)
    run = runfolder.load(args.run_dir, update)
    stochastic = True if args.stochastic else None
    # Every setting is checked before the evaluation starts, so a bad one costs no compile.
    run._rows(seeds)
    config = run.eval_config(episodes, stochastic, env_params)
    chosen = len(run.seeds) if seeds is None else len(seeds)
    print(f"evaluating {run.algo} on {run.env_id} at update {run.update}: {chosen} seed(s) x "
          f"{config.eval_episodes} episode(s)...", flush=True)  # fmt: skip
    result = run.evaluation(episodes=episodes, stochastic=stochastic, seeds=seeds, env_params=env_params)
    _print_table(result)
    path = result.save(args.name)
    print(f"eval file: {path}")
    return 0


def _seeds(text: str) -> list[int]:
    """--seeds 0,2,5 as a list of seed ids."""
    from kl_rl import config as config_lib

    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise ConfigError(f"--seeds takes the run's seed ids separated by commas, e.g. 0,2; got {text!r}")
    return [config_lib.parse_value("seeds", p, int) for p in parts]


def _print_table(result) -> None:
    summary = result.summary()
    how = "stochastic" if result.stochastic else "mode"
    params = ", ".join(f"{k}={v:g}" for k, v in result.env_params.items())
    print(
        f"\n{result.algo} on {result.env_id} at update {result.update} of {result.num_updates}: "
        f"{len(result.seeds)} seed(s) x {result.episodes} episode(s), {how}"
        + (f", env params {params}" if params else "")
    )
    print(f"{'seed':>6} {'return':>10} {'min':>10} {'max':>10}")
    for seed, ret, row in zip(result.seeds, summary["return"], result.returns, strict=True):
        if ret is None or not np.all(np.isfinite(row)):
            print(f"{seed:>6} {'non-finite':>10}")
            continue
        print(f"{seed:>6} {ret:>10.2f} {row.min():>10.2f} {row.max():>10.2f}")
    median, iqm = summary["return_median"], summary["return_iqm"]
    shown = "-" if median is None or math.isnan(median) else f"{median:.2f}"
    print(f"{'median':>6} {shown:>10}   IQM {'-' if iqm is None else f'{iqm:.2f}'}")
