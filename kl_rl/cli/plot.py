"""`kl-rl plot`: the figures that fit the given run and sweep folders, as PNG and SVG."""

import sys
from pathlib import Path

from kl_rl.cli.common import Parser, check_out
from kl_rl.errors import ConfigError

USAGE = """usage: kl-rl plot RUN_OR_SWEEP_DIR... [--out DIR]

Writes figures (PNG and SVG) of run and sweep folders into --out (default: plots/ inside the first
folder given); a folder holding run folders stands for all of them:
  learning_curves, learning_curves_wall_time  mean return over seeds with 95% bootstrap bands
  kl_curves                                    return and KL per update over training
for each sweep:
  return_kl_tradeoff_<param>                   final return vs mean KL over its first numeric swept
                                               hyperparameter
  learning_curves_by_config                    one line per grid point (when more than the sweep
                                               is plotted; otherwise learning_curves already is)
with train runs of several algorithms, on the envs they share (normalized by
kl_rl.analysis.REFERENCE_SCORES; an algorithm's run folders on one env pooled as its runs there):
  interval_estimates, performance_profile      mean, median, IQM, optimality gap of final returns
                                               and score distributions, stratified bootstrap CIs"""


def main(argv: list[str]) -> int:
    """`kl-rl plot RUN_OR_SWEEP_DIR... [--out DIR]`: writes the figures that fit the folders, prints their paths.

    Raises:
      ConfigError: the analysis extra is missing, no folder, a missing folder, one that is not a
        run or sweep folder (one line).
    """
    try:
        from kl_rl import analysis, plots
    except ImportError as err:
        raise ConfigError(f"kl-rl plot needs {err.name}; install it with pip install 'kl_rl[analysis]'") from None
    parser = Parser(prog="kl-rl plot", add_help=False)
    parser.add_argument("folders", nargs="*")
    parser.add_argument("--out", default=None)
    parser.add_argument("-h", "--help", action="store_true")
    args = parser.parse_args(argv)
    if args.help:
        print(USAGE)
        return 0
    if not args.folders:
        raise ConfigError("kl-rl plot needs at least one run or sweep folder (see kl-rl plot --help)")
    df = analysis.load(args.folders)
    out = Path(args.out) if args.out else Path(args.folders[0]) / "plots"
    check_out(out)
    for name, fig in plots.figures(df, log=lambda line: print(line, file=sys.stderr)):
        for path in plots.save(fig, out / name):
            print(path)
    return 0
