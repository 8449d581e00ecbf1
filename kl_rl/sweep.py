"""Sweeps: a grid of hyperparameters times seeds, compiled once per set of shape-fixing values.

    >>> result = kl_rl.sweep.run_sweep("ppo", "CartPole-v1", {"lr": [3e-4, 1e-3], "clip_eps": [0.1, 0.2]}, seeds=4)
    >>> result.ranking()[0]      # the configuration with the best IQM of final return, with its CI

Traced hyperparameters (learning rate, clip, gamma, lambda, coefficients, KL targets, delta, ...)
are array leaves of the config, so every grid point that shares the static fields (shapes, loop
counts, switches) runs through one set of compiled programs: the (grid point, seed) pairs are
the items of one batch (`kl_rl.parallel`), each with its own config, spread over the local
devices as `kl_rl.run` spreads seeds. Grid points that differ in a static field (num_envs,
num_steps, hidden_sizes, population_size, ...) fall into separate groups, each compiled once.
A group larger than `chunk_size` runs in chunks through the same compiled programs (the last
chunk padded with copies of its final config, which are dropped).

On CPU a (point, seed)'s result is the same bits as `kl_rl.run` of that config and seed, whatever
else the sweep holds and however many devices it runs on.
"""

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kl_rl import config as config_lib
from kl_rl import envs, parallel, runner
from kl_rl.agents import algo_spec
from kl_rl.errors import ConfigError
from kl_rl.train import make_trainer


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
            raise ConfigError(f"malformed --grid item {item!r}; write NAME=V1,V2,... (e.g. lr=3e-4,1e-3)")
        if name.startswith(config_lib.ENV_PREFIX):  # env.NAME: an env param, traced like a hyperparameter
            if name in grid:
                raise ConfigError(f"--grid names {name!r} twice; give all its values in one item")
            grid[name] = [config_lib.parse_value(name, v, float) for v in values]
            continue
        if name not in names:
            raise ConfigError(f"unknown hyperparameter {name!r} for {cls.__name__} in --grid (see kl-rl train --help)")
        if name in grid:
            raise ConfigError(f"--grid names {name!r} twice; give all its values in one item")
        if name in ("total_steps", "iterations"):
            raise ConfigError(f"--grid cannot vary {name}; sweep one budget at a time")
        grid[name] = [config_lib.parse_value(name, v.replace(":", ","), types[name]) for v in values]
    return grid


def expand(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in row-major order of the grid's names."""
    names = list(grid)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(grid[n] for n in names))]


def static_key(config: Any) -> tuple:
    """The values of a config's static fields: configs sharing it share one compiled program."""
    cls = type(config)
    fields = dataclasses.fields(cls)
    return tuple((f.name, getattr(config, f.name)) for f in fields if config_lib.is_static(cls, f.name))


def bootstrap_iqm_ci(x: np.ndarray, reps: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the IQM, resampling seeds with replacement."""
    x = np.asarray(x, np.float64)
    rng = np.random.default_rng(seed)
    samples = [runner.iqm(x[rng.integers(0, len(x), len(x))]) for _ in range(reps)]
    lo, hi = np.quantile(samples, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


@dataclasses.dataclass
class SweepResult:
    """A finished sweep, in host memory: per grid point, seed and update."""

    algo: str
    env_id: str
    grid: dict[str, list[Any]]
    points: list[dict[str, Any]]
    seeds: list[int]
    metrics: dict[str, np.ndarray]  # each [num_points, num_seeds, max updates], NaN past a point's own
    eval_returns: np.ndarray  # [num_points, num_seeds, max eval_episodes], NaN-padded likewise
    num_updates: list[int]  # per grid point (static fields such as num_steps change it)
    programs: list[dict[str, Any]]  # per compiled program: its points, compile and run time
    anchors: dict[str, Any] = dataclasses.field(default_factory=dict)  # reference / init_from records

    @property
    def final_returns(self) -> np.ndarray:
        """[num_points, num_seeds] mean evaluation return of each final policy."""
        return np.nanmean(self.eval_returns, axis=-1)

    def rows(self) -> list[dict[str, Any]]:
        """The tidy table: one row per grid point, seed and update, hyperparameters as columns."""
        names = sorted(self.metrics)
        rows = []
        for p, point in enumerate(self.points):
            num_updates = self.num_updates[p]
            for s, seed in enumerate(self.seeds):
                for u in range(num_updates):
                    row = {"point": p, **{k: _plain(v) for k, v in point.items()}, "seed": seed, "update": u + 1}
                    # A metric named like a swept hyperparameter (PPO's annealed `lr`) gets a suffix.
                    for name in names:
                        row[name + ("_metric" if name in point else "")] = _plain(self.metrics[name][p, s, u])
                    row["eval_return"] = _plain(self.final_returns[p, s]) if u == num_updates - 1 else None
                    rows.append(row)
        return rows

    def ranking(self) -> list[dict[str, Any]]:
        """Grid points ranked by the IQM of final return over seeds (ties by mean), best first, with 95% CIs."""
        ranked = []
        for p, point in enumerate(self.points):
            final = self.final_returns[p]
            lo, hi = bootstrap_iqm_ci(final)
            ranked.append(
                {
                    "point": p,
                    **{k: _plain(v) for k, v in point.items()},
                    "final_return_iqm": runner.iqm(final),
                    "iqm_ci95": [lo, hi],
                    "final_return_median": float(np.median(final)),
                    "final_return_mean": float(np.mean(final)),
                    "final_return": [float(x) for x in final],
                }
            )
        return sorted(ranked, key=lambda r: (-r["final_return_iqm"], -r["final_return_mean"]))

    def save(self, out_dir: Any, base_config: dict[str, Any]) -> Any:
        """Writes config.json, metrics.csv (the tidy table) and summary.json (the ranking), atomically."""
        summary = {
            "algo": self.algo,
            "env": self.env_id,
            "seeds": self.seeds,
            "grid": {k: [_plain(v) for v in vs] for k, vs in self.grid.items()},
            "num_points": len(self.points),
            "compiled_programs": len(self.programs),
            "programs": self.programs,
            "ranking": self.ranking(),
            **self.anchors,
            **runner.provenance(),
        }
        return runner.write_run_folder(out_dir, {**self.anchors, **base_config}, self.rows(), summary)


def _plain(x: Any) -> Any:
    if isinstance(x, tuple):
        return ":".join(str(v) for v in x)
    return runner._scalar(x)


def run_sweep(
    algo: str,
    env: str,
    grid: dict[str, list[Any]],
    seeds: int,
    config_file: Any = None,
    overrides: dict[str, Any] | None = None,
    chunk_size: int = 64,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
    env_path: str = "auto",
    vectorization: str = "sync",
    devices: int | None = None,
    reference: Any = None,
    reference_seed: int | None = None,
    init_from: Any = None,
) -> SweepResult:
    """Runs every grid point on seeds 0..seeds-1: one compiled program per static group.

    Args:
      algo, env: names as for `kl_rl.run`.
      grid: {hyperparameter: values}; combinations are taken in full.
      seeds: seeds per grid point.
      config_file, overrides: the base config under the grid (preset < file < overrides < grid).
      chunk_size: most grid points one program call runs at once (memory bound).
      log: optional function receiving one line per compiled program.
      progress: show a tqdm bar of env steps (all grid points and seeds), opened after the
        first compilation and advanced from inside the compiled programs.
      env_path, vectorization: as for `kl_rl.run`. On the host path one vector env holds the
        copies of a whole chunk (points x seeds x num_envs).
      devices: as for `kl_rl.run`: the (point, seed) items of a chunk are spread over them.
      reference, reference_seed, init_from: as for `kl_rl.run`; seed s of every grid point
        takes the same reference and starting parameters.
    """
    if not isinstance(seeds, int) or seeds <= 0:
        raise ConfigError(f"--seeds must be a positive integer, got {seeds!r}")
    if chunk_size <= 0:
        raise ConfigError(f"--chunk-size must be a positive integer, got {chunk_size}")
    points = expand(grid)
    configs = [runner.resolve_config(algo, env, config_file, {**(overrides or {}), **p}, env_path) for p in points]
    groups: dict[tuple, list[int]] = {}
    for i, config in enumerate(configs):
        groups.setdefault(static_key(config), []).append(i)
    # A grid point that sets a reference flag without --reference is refused, as a run is.
    for config in configs[1:] if reference is None else ():
        runner.resolve_anchors(algo, env, config, env_path=env_path)
    anchors = runner.resolve_anchors(algo, env, configs[0], reference, reference_seed, init_from, env_path)
    env_obj = envs.make(env, env_path, vectorization)
    keys = jax.vmap(jax.random.key)(np.arange(seeds))
    cache_dir = runner.enable_compilation_cache()
    outputs: dict[int, Any] = {}
    programs = []
    trainers = [make_trainer(algo, configs[members[0]], env_obj, anchors.reference) for members in groups.values()]
    total_steps = sum(
        t.steps_per_update * configs[m[0]].num_updates * len(m) * seeds
        for t, m in zip(trainers, groups.values(), strict=True)
    )
    bar = None
    done_before = 0  # env steps of the chunks already finished
    for trainer, members in zip(trainers, groups.values(), strict=True):
        size = min(chunk_size, len(members))
        # One layout, and so one set of programs, for every chunk of the group: the last chunk
        # is padded with copies of its final point, which are dropped.
        lay = parallel.layout(size * seeds, devices, host_env=trainer.env_path == "host")
        key = runner.program_key(algo, env, trainer.env_path, configs[members[0]], anchors)
        group = parallel.Programs(trainer, lay, cache_dir, key)
        run_s = 0.0
        for start in range(0, len(members), size):
            chunk = members[start : start + size]
            padded = chunk + [chunk[-1]] * (size - len(chunk))
            # Items are (point, seed) pairs, point-major; padded points run but are not counted.
            chunk_steps = trainer.steps_per_update * len(chunk) * seeds

            def report(updates_done, first, chunk_steps=chunk_steps, before=done_before):
                nonlocal bar
                if not progress:
                    return
                if bar is None:
                    from tqdm.auto import tqdm

                    bar = tqdm(total=total_steps, unit="step", unit_scale=True, desc=f"sweep {algo} {env}")
                bar.update(before + updates_done * chunk_steps - bar.n)

            item_keys = jnp.tile(keys, size)
            item_configs = [configs[i] for i in padded for _ in range(seeds)]
            item_seeds = list(range(seeds)) * size
            _, metrics, eval_returns, wall = runner.train_items(
                group, item_keys, item_configs, report, setup=lambda item_seeds=item_seeds: anchors.setup(item_seeds)
            )
            run_s += wall
            done_before += chunk_steps * configs[chunk[0]].num_updates
            for j, i in enumerate(chunk):
                rows = slice(j * seeds, (j + 1) * seeds)
                outputs[i] = ({k: v[rows] for k, v in metrics.items()}, eval_returns[rows])
        programs.append({"points": members, "compile_time_s": group.compile_time_s, "run_time_s": run_s})
        if log is not None:
            if bar is not None:
                bar.clear()  # the log line goes above the bar instead of through it
            log(
                f"program {len(programs)}/{len(groups)}: {len(members)} grid point(s) x {seeds} seed(s) "
                f"on {len(lay.devices)} device(s), compiled once in {group.compile_time_s:.1f}s, ran in {run_s:.1f}s"
            )
            if bar is not None:
                bar.refresh()
    if bar is not None:
        bar.close()
    order = range(len(points))
    metrics = {name: _pad_stack([outputs[i][0][name] for i in order]) for name in outputs[0][0]}
    return SweepResult(
        algo=algo,
        env_id=env,
        grid=grid,
        points=points,
        seeds=list(range(seeds)),
        metrics=metrics,
        eval_returns=_pad_stack([outputs[i][1] for i in order]),
        num_updates=[configs[i].num_updates for i in order],
        programs=programs,
        anchors=anchors.records,
    )


def _pad_stack(arrays: list[np.ndarray]) -> np.ndarray:
    """Stacks [seeds, n_i] arrays into [points, seeds, max n_i], padding with NaN."""
    width = max(a.shape[-1] for a in arrays)
    out = np.full((len(arrays), *arrays[0].shape[:-1], width), np.nan, np.float64)
    for i, a in enumerate(arrays):
        out[i, ..., : a.shape[-1]] = a
    return out
