"""`kl-rl sweep`: a grid of hyperparameters x seeds, ranked by IQM of final return."""

from kl_rl.cli.common import Diverged, device_count, out_dir, run_overrides, run_parser, source_args
from kl_rl.cli.progress import Bar
from kl_rl.errors import ConfigError


def main(argv: list[str]) -> int:
    """`kl-rl sweep ...`: bad input raises ConfigError, which `kl_rl.cli.main` prints as one line."""
    from kl_rl import cli, distributed, envs, logging_wandb, parallel, resolve, sweep
    from kl_rl import config as config_lib

    parser = run_parser("kl-rl sweep", "A grid of hyperparameters x seeds.", seeds_default="4")
    parser.add_argument("--grid", nargs="+", default=[], metavar="NAME=V1,V2")
    parser.add_argument("--chunk-size", default="64")
    args, extra = parser.parse_known_args(argv)
    if args.help:
        print(cli.__doc__.strip())
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
    parallel.check_batching(args.batching)
    overrides = run_overrides(args, extra)
    grid = sweep.parse_grid(args.algo, args.grid)
    base = resolve.resolve_config(args.algo, args.env, args.config, overrides, args.env_path)
    out = out_dir(args, prefix="sweep-")
    if args.wandb is not None:
        logging_wandb.check(args.wandb)
    points = len(sweep.expand(grid))
    print(f"sweep of {args.algo} on {args.env}: {points} grid point(s) x {seeds} seed(s)", flush=True)
    with Bar(f"sweep {args.algo} {args.env}", enabled=not args.no_progress) as bar:
        result = sweep.run_sweep(
            args.algo, args.env, grid, seeds, args.config, overrides, chunk_size, log=bar.log, progress=bar,
            env_path=args.env_path, vectorization=args.vectorization,
            devices=device_count(args.devices), batching=args.batching, **source_args(args),
        )  # fmt: skip
    print(f"compiled {len(result.programs)} program(s) for {points} grid point(s)")
    ranking = result.ranking()
    names = list(grid)
    print("rank " + " ".join(f"{n:>14}" for n in names) + "   IQM final_return  95% CI")
    for rank, row in enumerate(ranking, 1):
        values = " ".join(f"{row[n]!s:>14}" for n in names)
        if row.get("diverged"):
            first = row["diverged"][0]
            print(f"{'-':>4} {values}   diverged: {len(row['diverged'])} of {seeds} seed(s), "
                  f"seed {first['seed']} first at update {first['update']}")  # fmt: skip
            continue
        lo, hi = row["iqm_ci95"]
        print(f"{rank:>4} {values}   {row['final_return_iqm']:>16.2f}  [{lo:.2f}, {hi:.2f}]")
    env_path = envs.resolve_path(args.env, args.env_path)
    run = {"algo": args.algo, "env": args.env, "seeds": seeds, "env_path": env_path, "batching": result.batching}
    if env_path == "host":
        run["vectorization"] = args.vectorization
    if distributed.is_main():  # of several processes, process 0 writes the folder with every item
        folder_config = {**run, **config_lib.to_dict(base)}
        result.save(out, folder_config)
        if args.wandb is not None:
            logging_wandb.log_sweep(result, args.wandb, folder=out.name, base_config=folder_config)
            print(f"logged {points} grid point(s) to W&B project {args.wandb!r}, groups {out.name}-point<P>")
    print(f"sweep folder: {out}")
    diverged = result.diverged_items()
    if diverged:
        first = diverged[0]
        point = ", ".join(f"{k}={sweep._plain(v)}" for k, v in result.points[first["point"]].items())
        points = len({d["point"] for d in diverged})
        raise Diverged(
            f"grid point {first['point']} ({point}) diverged: seed {first['seed']} at update {first['update']} of "
            f"{result.num_updates[first['point']]} (non-finite values); {points} of {len(result.points)} point(s) "
            f"diverged and are not ranked; the sweep folder {out} holds their metrics up to then"
        )
    return 0
