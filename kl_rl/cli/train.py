"""`kl-rl train`: a new run on seeds 0..N-1, or `--resume DIR` of a checkpointed one."""

import argparse
import dataclasses
import json

from kl_rl.cli.common import Diverged, device_count, out_dir, run_overrides, run_parser, source_args
from kl_rl.cli.progress import Bar
from kl_rl.errors import ConfigError

_RUN_FLAGS = (
    "--seeds", "--env-path", "--vectorization", "--batching", "--reference", "--reference-seed", "--init-from",
)  # fmt: skip
"""Flags that --resume refuses: they are the run's, read from its folder."""


def main(argv: list[str]) -> int:
    """`kl-rl train ...`: bad input raises ConfigError, which `kl_rl.cli.main` prints as one line."""
    from kl_rl import config as config_lib
    from kl_rl import distributed, envs, logging_wandb, parallel, resolve, runfolder, sources

    parser = run_parser("kl-rl train", "Train an agent on seeds 0..N-1.", seeds_default="1")
    parser.add_argument("--checkpoint-every", default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--tensorboard", action="store_true")
    args, extra = parser.parse_known_args(argv)
    if args.help:
        print(
            "usage: kl-rl train --algo ALGO --env ENV [--seeds N] [--total-steps N] [--out DIR] "
            "[--config FILE.yaml|.toml] [--checkpoint-every UPDATES] [--tensorboard] [--wandb PROJECT] "
            "[--no-progress] [--devices N] "
            "[--batching map|vmap] "
            "[--reference RUN_DIR [--reference-seed S]] [--init-from RUN_DIR] [--<hyperparameter> VALUE ...]\n"
            "       kl-rl train --resume DIR [--tensorboard] [--wandb PROJECT] [--no-progress]\n"
        )
        print(_help(args.algo))
        return 0
    if args.resume is not None:
        return _resume(args, extra, argv)
    seeds = config_lib.parse_value("seeds", args.seeds, int)
    if seeds <= 0:
        raise ConfigError(f"--seeds must be a positive integer, got {seeds}")
    parallel.check_batching(args.batching)
    every = config_lib.parse_value("checkpoint_every", args.checkpoint_every or 0, int)
    if every < 0:
        raise ConfigError(f"--checkpoint-every must be a non-negative number of updates, got {every}")
    overrides = run_overrides(args, extra)
    config = resolve.resolve_config(args.algo, args.env, args.config, overrides, args.env_path)
    env_path = envs.resolve_path(args.env, args.env_path)
    run_sources = sources.resolve_sources(args.algo, args.env, config, env_path=env_path, **source_args(args))
    out = out_dir(args, prefix="")
    if args.tensorboard:
        runfolder.require_tensorboard()
    if args.wandb is not None:
        logging_wandb.check(args.wandb)
    checkpoint_dir = None
    if every:
        # Checkpoints go into the run folder while it trains, so it must not hold another run.
        if out.exists() and any(out.iterdir()):
            raise ConfigError(
                f"--out {str(out)!r} already holds files; --checkpoint-every needs a new or empty folder "
                "(continue a run with kl-rl train --resume DIR)"
            )
        # Of several processes, each checks the folder before process 0 writes into it.
        distributed.barrier("out-checked")
        out.mkdir(parents=True, exist_ok=True)
        checkpoint_dir = out
        run_config = runfolder.run_config(
            args.algo, args.env, list(range(seeds)), config, every, env_path, args.vectorization, run_sources.records,
            args.batching,
        )  # fmt: skip
        if distributed.is_main():
            (out / "config.json").write_text(json.dumps(run_config, indent=2) + "\n")
    where = "" if env_path == "jax" else f" (host-side gymnasium envs, {args.vectorization})"
    print(f"compiling {args.algo} on {args.env}{where} for {seeds} seed(s)...", flush=True)
    return _run_and_save(
        args, args.algo, args.env, seeds, config, out, checkpoint_dir, every, env_path, args.vectorization, run_sources,
        args.batching,
    )  # fmt: skip


def _help(algo: str) -> str:
    from kl_rl import config as config_lib
    from kl_rl.agents import algo_spec

    cls = algo_spec(algo).config
    docs = config_lib.field_docs(cls)
    lines = [f"hyperparameters of --algo {algo} (static ones change the compiled program's shapes):"]
    for f in dataclasses.fields(cls):
        kind = "static" if config_lib.is_static(cls, f.name) else "traced"
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        lines.append(f"  --{f.name.replace('_', '-'):<22} {kind:<6} default {default!r}: {docs.get(f.name, '')}")
    return "\n".join(lines)


def _run_and_save(
    args, algo, env, seeds, config, out, checkpoint_dir, every, env_path, vectorization, sources, batching
) -> int:
    """What a new run and a resumed one share: train, print the table, write the run folder.

    Raises:
      Diverged: a seed went non-finite; the folder is written first, for its metrics up to then.
    """
    from kl_rl import distributed, logging_wandb, runner

    with Bar(f"{algo} {env}", enabled=not args.no_progress) as bar:
        result = runner.run(
            algo, env, seeds=seeds, config=config, progress=bar,
            checkpoint_dir=checkpoint_dir, checkpoint_every=every, env_path=env_path, vectorization=vectorization,
            devices=device_count(args.devices), batching=batching, run_sources=sources,
        )  # fmt: skip
    _print_table(result)
    if distributed.is_main():  # of several processes, process 0 writes the folder with every item
        result.save(out, checkpoint_every=every, tensorboard=args.tensorboard)
        if args.wandb is not None:
            logging_wandb.log_run(result, args.wandb, group=out.name)
            print(f"logged {len(result.seeds)} seed(s) to W&B project {args.wandb!r}, group {out.name!r}")
    print(f"run folder: {out}")
    diverged = [(seed, u) for seed, u in zip(result.seeds, result.diverged, strict=True) if u is not None]
    if diverged:
        seed, update = diverged[0]
        raise Diverged(
            f"seed {seed} diverged at update {update} of {config.num_updates} (non-finite values); "
            f"{len(diverged)} of {seeds} seed(s) diverged; metrics up to that point are in {out}"
        )
    return 0


def _resume(args: argparse.Namespace, extra: list[str], argv: list[str]) -> int:
    """kl-rl train --resume DIR: continues a checkpointed run from its newest checkpoint."""
    from pathlib import Path

    from kl_rl import logging_wandb, runfolder, sources

    run_dir = Path(args.resume)
    spec = runfolder.read_run_config(run_dir)
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
            "--resume continues a run exactly as configured; give no other settings than --no-progress, "
            "--tensorboard, --wandb"
        )
    if (run_dir / "summary.json").exists():
        raise ConfigError(f"the run in {str(run_dir)!r} has already finished; there is nothing to resume")
    if args.tensorboard:
        runfolder.require_tensorboard()
    if args.wandb is not None:
        logging_wandb.check(args.wandb)
    from kl_rl.checkpoint import Checkpointer

    ckpt = Checkpointer(run_dir, read_only=True)
    latest = ckpt.latest() or 0
    ckpt.close()
    print(
        f"resuming {algo} on {env} for {len(seeds)} seed(s) in {run_dir} "
        f"from update {latest} of {config.num_updates}...",
        flush=True,
    )
    # The reference is in the checkpoints: its record names the network, nothing is reloaded.
    records = spec.sources
    run_sources = sources.resolve_sources(
        algo, env, config, records.get("reference"), None, records.get("init_from"), spec.env_path
    )
    return _run_and_save(
        args, algo, env, len(seeds), config, run_dir, run_dir, every, spec.env_path, spec.vectorization, run_sources,
        spec.batching,
    )  # fmt: skip


def _print_table(result) -> None:
    import jax

    from kl_rl import distributed

    final = result.final_returns
    last_train = result.metrics["episode_return"][:, -1]
    summary = result.summary()
    print(f"\n{result.algo} on {result.env_id}: {len(result.seeds)} seed(s) x {result.total_env_steps:,} env steps")
    metrics = result.metrics
    # Token tasks show the KL to the reference (summed over the response); other runs KL(old || new).
    kl_col = "kl_ref" if "response_length" in metrics and "kl_ref" in metrics else "kl"
    # A metric the algorithm does not have (SFT's KL) is left out, not printed as nan.
    cols = [c for c in (kl_col, "entropy") if c in metrics]
    widths = {kl_col: 10, "entropy": 9}
    print(f"{'seed':>6} {'final_return':>13} {'train_return':>13}" + "".join(f" {c:>{widths[c]}}" for c in cols))
    for i, (seed, diverged) in enumerate(zip(result.seeds, summary["diverged"], strict=True)):
        if diverged is not None:
            # A row of nan says nothing; where it went wrong does.
            print(f"{seed:>6}   diverged at update {diverged}")
            continue
        values = "".join(f" {metrics[c][i, -1]:>{widths[c]}.{5 if c == kl_col else 4}f}" for c in cols)
        print(f"{seed:>6} {final[i]:>13.2f} {last_train[i]:>13.2f}{values}")
    median, iqm = summary["final_return_median"], summary["final_return_iqm"]
    stats = f"{'-':>13}   IQM -" if median is None else f"{median:>13.2f}   IQM {iqm:.2f}"
    if summary["diverged_seeds"] and median is not None:
        stats += f" over {len(result.seeds) - summary['diverged_seeds']} finite seed(s)"
    print(
        f"{'median':>6} {stats}   "
        f"wall {result.wall_time_s:.1f}s   compile {result.compile_time_s:.1f}s"
        f"{' (cached)' if result.compiled_from_cache else ''}   "
        f"{result.env_steps_per_s:,.0f} env steps/s on {result.devices} device(s), {result.batching} batching"
    )
    joined_s = distributed.join_time_s()
    if joined_s is not None:  # the wall time above holds the gathers; the join came before it
        print(f"joined {jax.process_count()} processes in {joined_s:.1f}s")
    if result.env_time_s is not None:
        share = result.env_time_s / result.wall_time_s
        print(f"host-side envs ({result.vectorization}): {result.env_time_s:.1f}s stepping, {share:.0%} of wall time")
