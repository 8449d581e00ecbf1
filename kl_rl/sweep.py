"""Sweeps: a grid of hyperparameters times seeds, compiled once per set of shape-fixing values.

    >>> result = kl_rl.sweep.run_sweep("ppo", "CartPole-v1", {"lr": [3e-4, 1e-3], "clip_eps": [0.1, 0.2]}, seeds=4)
    >>> result.ranking()[0]      # the configuration with the best IQM of final return, with its CI

Traced hyperparameters (learning rate, clip, gamma, lambda, coefficients, KL targets, delta, ...)
are array leaves of the config, so every grid point that shares the static fields (shapes, loop
counts, switches) runs through one set of compiled programs: the (grid point, seed) pairs are
the items of one batch (`kl_rl.pipeline`), each with its own config, spread over the local
devices as `kl_rl.run` spreads seeds. Grid points that differ in a static field (num_envs,
num_steps, hidden_sizes, population_size, ...) fall into separate groups, each compiled once.
A group larger than `chunk_size` runs in chunks through the same compiled programs (the last
chunk padded with copies of its final config, which are dropped).

A (point, seed) that goes non-finite is recorded with its update (`SweepResult.diverged`), and its
point is not ranked as a number. On CPU a (point, seed)'s result is the same bits as `kl_rl.run`
of that config and seed, whatever else the sweep holds and however many devices it runs on.
"""

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kl_rl import config as config_lib
from kl_rl import pipeline, resolve, runfolder, stats
from kl_rl.agents import algo_spec
from kl_rl.errors import ConfigError


def parse_grid(algo: str, items: list[str]) -> dict[str, list[Any]]:
    """{name: values} from CLI items "name=v1,v2,..." (tuple fields: widths joined by ':', e.g.
    hidden_sizes=64:64,128:128).

    Raises:
      ConfigError: a malformed item, an unknown or repeated name, or a value of the wrong type.
    """
    cls = algo_spec(algo).config
    types = config_lib._field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    grid: dict[str, list[Any]] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        values = [v.strip() for v in text.split(",")]
        if not sep or not name or not all(values):
            raise ConfigError(f"malformed {{grid}} item {item!r}; write NAME=V1,V2,... (e.g. lr=3e-4,1e-3)", "grid")
        if name.startswith(config_lib.ENV_PREFIX):  # env.NAME: an env param, traced like a hyperparameter
            if name in grid:
                raise ConfigError(f"{{grid}} names {name!r} twice; give all its values in one item", "grid")
            grid[name] = [config_lib.parse_value(name, v, float) for v in values]
            continue
        if name not in names:
            raise ConfigError(
                f"unknown hyperparameter {name!r} for {cls.__name__} in {{grid}} (see kl-rl train --help)", "grid"
            )
        if name in grid:
            raise ConfigError(f"{{grid}} names {name!r} twice; give all its values in one item", "grid")
        if name in ("total_steps", "iterations"):
            raise ConfigError(f"{{grid}} cannot vary {name}; sweep one budget at a time", "grid")
        grid[name] = [config_lib.parse_value(name, v.replace(":", ","), types[name]) for v in values]
    return grid


def expand(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in row-major order of the grid's names."""
    names = list(grid)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(grid[n] for n in names))]


@dataclasses.dataclass
class SweepResult:
    """A finished sweep, in host memory: per grid point, seed and update."""

    algo: str
    env_id: str
    grid: dict[str, list[Any]]
    points: list[dict[str, Any]]
    seeds: list[int]
    metrics: dict[str, np.ndarray]
    """Each [num_points, num_seeds, max updates], NaN past a point's own updates."""
    eval_returns: np.ndarray
    """[num_points, num_seeds, max eval_episodes], NaN past a point's own episodes."""
    num_updates: list[int]
    """Per grid point (static fields such as num_steps change it)."""
    programs: list[dict[str, Any]]
    """Per compiled group: its points, compile and run time."""
    diverged: list[list[int | None]] = dataclasses.field(default_factory=list)
    """[num_points][num_seeds]: the first update that went non-finite (`kl_rl.divergence`), or None."""
    eval_episodes: list[int] = dataclasses.field(default_factory=list)
    """Per grid point, its evaluation episodes."""
    sources: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The reference and starting runs' records (`kl_rl.sources.RunSources.records`)."""
    batching: str | None = None
    """How each device ran its (point, seed) items: "map" or "vmap" (`kl_rl.parallel`)."""

    def __post_init__(self):
        self.diverged = self.diverged or [[None] * len(self.seeds) for _ in self.points]
        self.eval_episodes = self.eval_episodes or [self.eval_returns.shape[-1]] * len(self.points)

    @property
    def final_returns(self) -> np.ndarray:
        """[num_points, num_seeds] mean evaluation return of each final policy; NaN where a seed diverged."""
        out = np.array([self.eval_returns[p, :, :n].mean(axis=-1) for p, n in enumerate(self.eval_episodes)])
        out[np.array([[d is not None for d in row] for row in self.diverged], bool).reshape(out.shape)] = np.nan
        return out

    def diverged_items(self) -> list[dict[str, Any]]:
        """Every (point, seed) that went non-finite, with its first non-finite update, in point order."""
        return [{"point": p, "seed": self.seeds[s], "update": u}
                for p, row in enumerate(self.diverged) for s, u in enumerate(row) if u is not None]  # fmt: skip

    def rows(self) -> list[dict[str, Any]]:
        """The tidy table: one row per grid point, seed and update, hyperparameters as columns.

        A diverged (point, seed) has rows up to and including its first non-finite update, and
        no eval_return, as a run's metrics.csv does.
        """
        names = sorted(self.metrics)
        final = self.final_returns
        rows = []
        for p, point in enumerate(self.points):
            num_updates = self.num_updates[p]
            for s, seed in enumerate(self.seeds):
                diverged = self.diverged[p][s]
                for u in range(diverged or num_updates):
                    row = {"point": p, **{k: _plain(v) for k, v in point.items()}, "seed": seed, "update": u + 1}
                    # A metric named like a swept hyperparameter (PPO's annealed `lr`) gets a suffix.
                    for name in names:
                        row[name + ("_metric" if name in point else "")] = _plain(self.metrics[name][p, s, u])
                    last = u == num_updates - 1 and diverged is None
                    row["eval_return"] = _plain(final[p, s]) if last else None
                    rows.append(row)
        return rows

    def ranking(self) -> list[dict[str, Any]]:
        """Grid points ranked by the IQM of final return over seeds (ties by mean), best first, with 95% CIs.

        A point any of whose seeds diverged is not ranked as a number: it follows the ranked
        points with `diverged` ([{"seed", "update"}]) and no IQM, CI, median or mean.
        """
        final = self.final_returns
        ranked, unranked = [], []
        for p, point in enumerate(self.points):
            row = {"point": p, **{k: _plain(v) for k, v in point.items()}}
            diverged = [{"seed": self.seeds[s], "update": u} for s, u in enumerate(self.diverged[p]) if u is not None]
            returns = [None if np.isnan(x) else float(x) for x in final[p]]
            if diverged:
                none = {
                    "final_return_iqm": None,
                    "iqm_ci95": None,
                    "final_return_median": None,
                    "final_return_mean": None,
                }
                unranked.append({**row, **none, "final_return": returns, "diverged": diverged})
                continue
            lo, hi = stats.bootstrap_iqm_ci(final[p])
            ranked.append(
                {
                    **row,
                    "final_return_iqm": stats.iqm(final[p]),
                    "iqm_ci95": [lo, hi],
                    "final_return_median": float(np.median(final[p])),
                    "final_return_mean": float(np.mean(final[p])),
                    "final_return": returns,
                }
            )
        return sorted(ranked, key=lambda r: (-r["final_return_iqm"], -r["final_return_mean"])) + unranked

    def save(self, out_dir: Any, base_config: dict[str, Any]) -> Any:
        """Writes config.json, metrics.csv (the tidy table) and summary.json (the ranking), atomically."""
        diverged = self.diverged_items()
        summary = {
            "algo": self.algo,
            "env": self.env_id,
            "seeds": self.seeds,
            "grid": {k: [_plain(v) for v in vs] for k, vs in self.grid.items()},
            "num_points": len(self.points),
            "compiled_programs": len(self.programs),
            "batching": self.batching,
            "programs": self.programs,
            "ranking": self.ranking(),
            "diverged": diverged,
            "diverged_points": len({d["point"] for d in diverged}),
            **self.sources,
            **runfolder.provenance(),
        }
        return runfolder.write_run_folder(out_dir, {**self.sources, **base_config}, self.rows(), summary)


def _plain(x: Any) -> Any:
    if isinstance(x, tuple):
        return ":".join(str(v) for v in x)
    return runfolder.plain(x)


def run_sweep(
    algo: str,
    env: str,
    grid: dict[str, list[Any]],
    seeds: int,
    config_file: Any = None,
    overrides: dict[str, Any] | None = None,
    chunk_size: int = 64,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> SweepResult:
    """Runs every grid point on seeds 0..seeds-1: one compiled program per static group.

    A (point, seed) that goes non-finite is recorded in `SweepResult.diverged` with its update,
    and its point is not ranked as a number.

    Args:
      algo, env: names as for `kl_rl.run`.
      grid: {hyperparameter: values}; combinations are taken in full.
      seeds: seeds per grid point.
      config_file, overrides: the base config under the grid (preset < file < overrides < grid).
      chunk_size: most grid points one program call runs at once (memory bound).
      log: optional function receiving one line per compiled program.
      progress: optional `progress(env_steps_done, env_steps_total)` over all grid points and
        seeds, called once the first programs are compiled and after each segment.
      **options: `kl_rl.pipeline.RunOptions` (env_path, vectorization, devices, batching,
        reference, reference_seed, init_from), as for `kl_rl.run`. On the host path one vector env holds
        the copies of a whole chunk (points x seeds x num_envs); the (point, seed) items of a
        chunk are spread over the devices; seed s of every grid point takes the same reference
        and starting parameters.
    """
    if not isinstance(seeds, int) or seeds <= 0:
        raise ConfigError(f"{{seeds}} must be a positive integer, got {seeds!r}", "seeds")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ConfigError(f"{{chunk_size}} must be a positive integer, got {chunk_size!r}", "chunk_size")
    opts = pipeline.RunOptions(**options)
    points = expand(grid)
    base = overrides or {}
    configs = [resolve.resolve_config(algo, env, config_file, {**base, **p}, opts.env_path) for p in points]
    groups = resolve.group_by_static(configs)
    # A grid point that sets a reference option without a reference is refused, as a run is.
    for config in configs[1:] if opts.reference is None else ():
        opts.sources(algo, env, config)
    run_sources = opts.sources(algo, env, configs[0])
    env_obj = opts.make_env(env)
    keys = jax.vmap(jax.random.key)(np.arange(seeds))
    log = log or (lambda line: None)
    # One layout, and so one set of programs, for every chunk of a group: the last chunk is
    # padded with copies of its final point, which are dropped.
    built = [pipeline.group(algo, env, env_obj, configs[m[0]], run_sources, min(chunk_size, len(m)) * seeds,
                            opts.devices, batching=opts.batching)
             for m in groups.values()]  # fmt: skip
    total = sum(g.trainer.steps_per_update * configs[m[0]].num_updates * len(m) * seeds
                for g, m in zip(built, groups.values(), strict=True))  # fmt: skip
    outputs: dict[int, Any] = {}
    programs = []
    done_before = 0  # env steps of the chunks already finished
    for group, members in zip(built, groups.values(), strict=True):
        size = group.layout.items // seeds
        run_s = 0.0
        try:
            for start in range(0, len(members), size):
                chunk = members[start : start + size]
                padded = chunk + [chunk[-1]] * (size - len(chunk))
                # Items are (point, seed) pairs, point-major; padded points run but are not counted.
                chunk_steps = group.trainer.steps_per_update * len(chunk) * seeds

                def report(updates_done, chunk_steps=chunk_steps, before=done_before):
                    if progress is not None:
                        progress(before + updates_done * chunk_steps, total)

                item_seeds = list(range(seeds)) * size
                outcome = pipeline.execute(
                    group, jnp.tile(keys, size), [configs[i] for i in padded for _ in range(seeds)], report,
                    setup=lambda item_seeds=item_seeds: run_sources.setup(item_seeds),
                )  # fmt: skip
                run_s += outcome.wall_time_s
                done_before += chunk_steps * configs[chunk[0]].num_updates
                for j, i in enumerate(chunk):
                    rows = slice(j * seeds, (j + 1) * seeds)
                    metrics = {k: v[rows] for k, v in outcome.metrics.items()}
                    outputs[i] = (metrics, outcome.eval_returns[rows], outcome.diverged[rows])
        finally:
            group.close()
        programs.append({"points": members, "compile_time_s": group.compile_time_s, "run_time_s": run_s})
        log(
            f"program {len(programs)}/{len(groups)}: {len(members)} grid point(s) x {seeds} seed(s) "
            f"on {len(group.layout.devices)} device(s), compiled once in {group.compile_time_s:.1f}s, "
            f"ran in {run_s:.1f}s"
        )
    order = range(len(points))
    return SweepResult(
        algo=algo,
        env_id=env,
        grid=grid,
        points=points,
        seeds=list(range(seeds)),
        metrics={name: _pad_stack([outputs[i][0][name] for i in order]) for name in outputs[0][0]},
        eval_returns=_pad_stack([outputs[i][1] for i in order]),
        num_updates=[configs[i].num_updates for i in order],
        programs=programs,
        diverged=[outputs[i][2] for i in order],
        eval_episodes=[configs[i].eval_episodes for i in order],
        sources=run_sources.records,
        batching=built[0].layout.mode,
    )


def _pad_stack(arrays: list[np.ndarray]) -> np.ndarray:
    """Stacks [seeds, n_i] arrays into [points, seeds, max n_i], padding with NaN."""
    width = max(a.shape[-1] for a in arrays)
    out = np.full((len(arrays), *arrays[0].shape[:-1], width), np.nan, np.float64)
    for i, a in enumerate(arrays):
        out[i, ..., : a.shape[-1]] = a
    return out
