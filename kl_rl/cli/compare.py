"""`kl-rl compare RUN_DIR...`: IQM with 95% CIs per algorithm x env, and P(improvement) per pair."""

import sys
import warnings

from kl_rl.cli.common import Parser
from kl_rl.errors import ConfigError

USAGE = """usage: kl-rl compare RUN_DIR... [--by algo|run] [--eval NAME] [--reps N] [--seed S]

One table of the final returns of kl-rl train run folders (a folder holding run folders stands
for all of them), from kl_rl.analysis.compare (Agarwal et al. 2021, arXiv:2108.13264):
  per algorithm x env   the IQM over seeds, its 95% stratified bootstrap CI and the seed count
  per pair              P(row > column): the chance that a seed of one scores above a seed of the
                        other, averaged over the envs both ran (ties count half), with its CI
  --by algo             an algorithm's folders on one env pool as its seeds there (default);
  --by run              each folder is its own row
  --eval NAME           the returns of each folder's eval/NAME.json (kl-rl eval --name NAME,
                        e.g. under other env params) instead of training's final evaluation
  --reps N              bootstrap resamples (default 10000); --seed S their seed (default 0)
Diverged seeds (no finite final return) are left out, and their count is shown."""


def main(argv: list[str]) -> int:
    """`kl-rl compare ...`: prints the table; bad input is a ConfigError (one line, exit 2)."""
    try:
        from kl_rl import analysis
    except ImportError as err:
        raise ConfigError(f"kl-rl compare needs {err.name}; install it with pip install 'kl_rl[analysis]'") from None
    from kl_rl import config as config_lib

    parser = Parser(prog="kl-rl compare", add_help=False)
    parser.add_argument("folders", nargs="*")
    parser.add_argument("--by", default="algo", choices=("algo", "run"))
    parser.add_argument("--eval", default=None)
    parser.add_argument("--reps", default="10000")
    parser.add_argument("--seed", default="0")
    parser.add_argument("-h", "--help", action="store_true")
    args = parser.parse_args(argv)
    if args.help:
        print(USAGE)
        return 0
    if not args.folders:
        raise ConfigError("kl-rl compare needs at least one run folder (see kl-rl compare --help)")
    reps = config_lib.parse_value("reps", args.reps, int)
    if reps <= 0:
        raise ConfigError(f"--reps must be a positive integer, got {reps}")
    seed = config_lib.parse_value("seed", args.seed, int)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        final = analysis.final_scores(analysis.load(args.folders))
        if args.eval is not None:
            final = analysis.evaluated_scores(final, args.eval)
        table = analysis.compare(final, by=args.by, reps=reps, seed=seed)
    for w in caught:
        print(f"kl-rl compare: note: {w.message}", file=sys.stderr)
    source = "final returns" if args.eval is None else f"returns of eval/{args.eval}.json"
    print(format_table(table, args.by, reps, source))
    return 0


def format_table(table, by: str, reps: int, source: str = "final returns") -> str:
    """The comparison as text: one row per group, one column per env, then the pairs' matrix."""
    cells, pairs = table.cells, table.pairs
    groups = list(dict.fromkeys(cells["group"]))
    envs = list(dict.fromkeys(sorted(cells["env"])))
    width = max(len(by), *(len(str(g)) for g in groups)) + 2

    def interval(est, lo, hi):
        return "-" if est != est else f"{est:.2f} [{lo:.2f}, {hi:.2f}]"

    text = {}
    for row in cells.itertuples():
        dropped = f", {row.dropped} diverged" if row.dropped else ""
        text[row.group, row.env] = f"{interval(row.iqm, row.low, row.high)} n={row.runs}{dropped}"
    col = max(len(e) for e in envs)
    col = max(col, *(len(t) for t in text.values())) + 3
    lines = [f"IQM of {source}, 95% stratified bootstrap CI ({reps:,} resamples), n seeds per cell"]
    lines.append(f"{by:<{width}}" + "".join(f"{e:<{col}}" for e in envs).rstrip())
    for g in groups:
        lines.append(f"{g!s:<{width}}" + "".join(f"{text.get((g, e), '-'):<{col}}" for e in envs).rstrip())
    if len(groups) > 1:
        p = {(r.x, r.y): (interval(r.p, r.low, r.high), r.envs) for r in pairs.itertuples()}
        pcol = max([len(str(g)) for g in groups] + [len(v[0]) for v in p.values()]) + 3
        lines += ["", "probability of improvement P(row > column) over the envs both ran, 95% CI"]
        lines.append(f"{by:<{width}}" + "".join(f"{g!s:<{pcol}}" for g in groups).rstrip())
        for x in groups:
            row = "".join(f"{'-' if x == y else p.get((x, y), ('no shared env',))[0]:<{pcol}}" for y in groups)
            lines.append(f"{x!s:<{width}}" + row.rstrip())
        partial = {tuple(sorted((str(r.x), str(r.y)))): r.envs for r in pairs.itertuples() if list(r.envs) != envs}
        for (x, y), shared in partial.items():
            lines.append(f"  {x} vs {y}: over {', '.join(shared)} only")
    return "\n".join(lines)
