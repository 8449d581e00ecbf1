"""Loading run and sweep folders into one table, and the statistics of Agarwal et al. (2021).

    >>> df = analysis.load(["runs/ppo-cartpole", "runs/trpo-cartpole"])   # one row per update
    >>> final = analysis.final_scores(df)                                 # one row per seed
    >>> scores = analysis.score_matrix(final, by="algo", normalize=True)  # {algo: [seeds, envs]}
    >>> analysis.interval_estimates(scores)                               # IQM etc. with 95% CIs

The aggregates and their confidence intervals follow "Deep Reinforcement Learning at the Edge of
the Statistical Precipice" (Agarwal et al., NeurIPS 2021): scores form a [runs, tasks] matrix
(runs are seeds, tasks are envs), and every confidence interval comes from a stratified bootstrap,
which resamples runs with replacement independently within each task, so each task keeps its
number of runs in every resample.

Needs the analysis extra: pip install 'kl_rl[analysis]'.
"""

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from kl_rl import stats
from kl_rl.errors import ConfigError

try:
    import pandas as pd
except ImportError as err:
    raise ConfigError("kl_rl.analysis needs pandas: pip install 'kl_rl[analysis]'") from err

# ---------------------------------------------------------------------------------------------
# Loading run folders
# ---------------------------------------------------------------------------------------------

ID_COLUMNS = ("run", "path", "kind", "algo", "env", "point")
"""The columns before the swept hyperparameters in `load`'s table."""

# metrics.csv's leading metrics (kl_rl.runfolder.RunResult.rows); the others follow sorted by name.
_FIRST_METRICS = ("episode_return", "episode_length", "kl", "entropy", "pg_loss", "vf_loss")

REFERENCE_SCORES: dict[str, tuple[float, float]] = {
    "Acrobot-v1": (-500.0, -100.0),
    "CartPole-v1": (23.75, 500.0),
    "MountainCar-v0": (-200.0, -110.0),
    "MountainCarContinuous-v0": (-32.18, 90.0),
    "Pendulum-v1": (-1224.41, -150.0),
}
"""(low, high) per env, for `normalize`: a score of 0 is the random policy's, 1 a good policy's.

low: the mean return of the uniform random policy over 100 episodes in kl_rl's JAX ports
(experiments/reference_scores.py, seed 0). high: CartPole-v1's maximum return (500 steps of
reward 1); for Acrobot-v1 (-100), MountainCar-v0 (-110) and MountainCarContinuous-v0 (90) the
`reward_threshold` gymnasium registers as solved; Pendulum-v1 has none, and -150 is about what a
well-trained swing-up policy scores. Normalized scores can exceed 1 (Acrobot, Pendulum, MountainCar)
or fall below 0.
"""


def load(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Reads train run and sweep folders into one tidy table, one row per (run, point, seed, update).

    Args:
      paths: a folder or a list of folders. Each is a run folder (`kl-rl train`), a sweep folder
        (`kl-rl sweep`), or a folder holding such folders one level down (others are skipped;
        `kl-rl tune` folders with a warning: read them with `load_trials`).

    Returns:
      Columns: `run` (the folder's name; its path where two loaded folders share a name), `path`,
      `kind` ("train" or "sweep"), `algo`, `env`, `point` (the grid point; 0 for train runs),
      the swept hyperparameters of every loaded sweep (NaN where a folder does not sweep them),
      `seed`, `update`, `env_steps`, the metrics (a metric named like a swept hyperparameter,
      such as PPO's annealed `lr`, is `<name>_metric` throughout), `eval_return` (the final
      policy's mean evaluation return, set on each seed's last update only) and `wall_time_s`.
      `wall_time_s` is the run time (compilation excluded) at the end of that update, prorated
      by update: the run's `wall_time_s` from summary.json, or for a sweep the `run_time_s` of
      the compiled program that ran the point, times update / updates. The seeds of a run (and
      the points of a program) train together, so they share it. NaN without summary.json.

    Raises:
      ConfigError: a path that does not exist or holds no run or sweep folder (one line).
    """
    folders = _run_folders(paths)
    names = [f.name for f in folders]
    frames, grids, hyper = [], [], []
    for folder, name in zip(folders, names, strict=True):
        frame, grid = _read_folder(folder, name if names.count(name) == 1 else str(folder))
        frames.append(frame)
        grids.append(grid)
        hyper += [h for h in grid if h not in hyper]
    fixed = {*ID_COLUMNS, "seed", "update", "env_steps", "eval_return", "wall_time_s"}
    metrics: list[str] = []
    for i, (frame, grid) in enumerate(zip(frames, grids, strict=True)):
        own = [c for c in frame.columns if c not in fixed and c not in grid]
        # A train run's `lr` metric next to a sweep of `lr`: suffixed as the sweep's own is.
        clashing = {c: c + "_metric" for c in own if c in hyper}
        frames[i] = frame.rename(columns=clashing)
        metrics += [clashing.get(c, c) for c in own if clashing.get(c, c) not in metrics]
    metrics = [m for m in _FIRST_METRICS if m in metrics] + sorted(m for m in metrics if m not in _FIRST_METRICS)
    df = pd.concat(frames, ignore_index=True, sort=False)
    columns = [*ID_COLUMNS, *hyper, "seed", "update", "env_steps", *metrics, "eval_return", "wall_time_s"]
    df = df.reindex(columns=columns)  # NaN for a hyperparameter a folder does not sweep
    for c in ("point", "seed", "update", "env_steps"):
        if df[c].notna().all() and np.all(df[c] == np.round(df[c])):
            df[c] = df[c].astype(np.int64)
    return df


def hyperparameters(df: pd.DataFrame) -> list[str]:
    """The swept hyperparameter columns of a `load` or `final_scores` table (between point and seed)."""
    columns = list(df.columns)
    return columns[columns.index("point") + 1 : columns.index("seed")]


def final_scores(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, point, seed): its id columns, hyperparameters, and `final_return`.

    `final_return` is `eval_return` at the seed's last update (the final policy's mean evaluation
    return); `env_steps` and `wall_time_s` are those at that update.
    """
    last = df.loc[df.groupby(["path", "point", "seed"], sort=False)["update"].idxmax()]
    keys = [*ID_COLUMNS, *hyperparameters(df), "seed"]
    out = last[[*keys, "update", "env_steps", "wall_time_s"]].copy()
    out["final_return"] = last["eval_return"].to_numpy(np.float64)
    return out.reset_index(drop=True)


def load_trials(path: str | os.PathLike) -> pd.DataFrame:
    """A `kl-rl tune` folder's metrics.csv (one row per trial), with `run`, `path`, `algo`, `env` in front.

    Raises:
      ConfigError: the folder is not a tune folder.
    """
    folder = Path(path)
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    if "space" not in config or not (folder / "metrics.csv").is_file():
        raise ConfigError(f"{folder} is not a kl-rl tune folder (no metrics.csv, or no search space in config.json)")
    trials = _read_csv(folder / "metrics.csv")
    ids = {"run": folder.name, "path": str(folder), "algo": config.get("algo"), "env": config.get("env")}
    return pd.concat([pd.DataFrame(ids, index=trials.index), trials], axis=1)


def _run_folders(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The run and sweep folders named by `paths`, parents expanded one level, each once."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    if not paths:
        raise ConfigError("no folders given; name a run or sweep folder written by kl-rl train or kl-rl sweep")
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ConfigError(f"{p} does not exist or is not a folder; give a kl-rl run or sweep folder")
        if (p / "metrics.csv").is_file():
            if _is_tune(p):
                raise ConfigError(f"{p} is a kl-rl tune folder (one row per trial); read it with analysis.load_trials")
            candidates = [p]
        else:
            candidates = sorted(
                d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".") and (d / "metrics.csv").is_file()
            )
            tuned = [d for d in candidates if _is_tune(d)]
            if tuned:
                warnings.warn(f"skipping kl-rl tune folder(s) {', '.join(d.name for d in tuned)} in {p}", stacklevel=3)
            candidates = [d for d in candidates if d not in tuned]
            if not candidates:
                raise ConfigError(f"{p} is not a kl-rl run or sweep folder (no metrics.csv), nor a folder of them")
        found += [c for c in candidates if c.resolve() not in {f.resolve() for f in found}]
    return found


def _is_tune(folder: Path) -> bool:
    return (folder / "config.json").is_file() and "space" in _read_json(folder / "config.json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from err
    if not isinstance(value, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return value


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {path}: {str(err).splitlines()[0]}") from err


def _read_folder(folder: Path, run: str) -> tuple[pd.DataFrame, list[str]]:
    """(the folder's rows with id columns and wall time, its swept hyperparameters)."""
    rows = _read_csv(folder / "metrics.csv")
    missing = [c for c in ("seed", "update") if c not in rows]
    if missing:
        raise ConfigError(f"{folder} is not a kl-rl run or sweep folder (its metrics.csv has no {missing[0]} column)")
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    summary = _read_json(folder / "summary.json") if (folder / "summary.json").is_file() else {}
    columns = list(rows.columns)
    sweep = "point" in rows
    # A sweep's metrics.csv starts point, <grid names>, seed, update (kl_rl.sweep.SweepResult.rows).
    grid = columns[columns.index("point") + 1 : columns.index("seed")] if sweep else []
    if not sweep:
        rows.insert(0, "point", 0)
    last = rows.groupby("point")["update"].transform("max")
    if sweep:
        program_time = {p: prog["run_time_s"] for prog in summary.get("programs", []) for p in prog["points"]}
        run_time = rows["point"].map(program_time).astype(np.float64)
    else:
        run_time = pd.Series(float(summary.get("wall_time_s", np.nan)), index=rows.index)
    rows["wall_time_s"] = run_time * rows["update"] / last
    ids = {
        "run": run,
        "path": str(folder),
        "kind": "sweep" if sweep else "train",
        "algo": config.get("algo", summary.get("algo")),
        "env": config.get("env", summary.get("env")),
    }
    for i, (name, value) in enumerate(ids.items()):
        rows.insert(i, name, value)
    if "eval_return" not in rows:
        rows["eval_return"] = np.nan
    return rows, grid


# ---------------------------------------------------------------------------------------------
# Aggregate metrics of a [runs, tasks] score matrix
# ---------------------------------------------------------------------------------------------


def _scores(scores: ArrayLike) -> np.ndarray:
    """Scores as float64 [..., runs, tasks]; a 1-D array is the runs of one task."""
    x = np.asarray(scores, np.float64)
    if x.ndim == 0:
        raise ConfigError("scores must be an array of runs [runs] or [runs, tasks], got a scalar")
    return x[:, None] if x.ndim == 1 else x


def normalize(scores: ArrayLike, low: ArrayLike, high: ArrayLike) -> np.ndarray:
    """(scores - low) / (high - low): 0 at `low`, 1 at `high`; low and high broadcast over tasks (the last axis).

    See `REFERENCE_SCORES` for each env's (low, high).
    """
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    return (np.asarray(scores, np.float64) - low) / (high - low)


_normalize = normalize  # score_matrix's `normalize` argument shadows the function


def mean(scores: ArrayLike) -> np.ndarray:
    """Mean over tasks of each task's mean score. Reduces the last two axes [..., runs, tasks] -> [...]."""
    return _scores(scores).mean(axis=(-2, -1))


def median(scores: ArrayLike) -> np.ndarray:
    """Median over tasks of each task's mean score (Agarwal et al. 2021). [..., runs, tasks] -> [...]."""
    return np.median(_scores(scores).mean(axis=-2), axis=-1)


def iqm(scores: ArrayLike) -> np.ndarray:
    """Interquartile mean: the mean of the middle 50% of all runs' scores pooled across tasks.

    With N pooled scores the cut points sit at N/4 and 3N/4; a score straddling one counts with
    the fraction of it inside (`kl_rl.stats.iqm`, which this pools for). [..., runs, tasks] -> [...].
    """
    x = _scores(scores)
    return np.asarray(stats.iqm(x.reshape(*x.shape[:-2], -1)))


def optimality_gap(scores: ArrayLike, gamma: float = 1.0) -> np.ndarray:
    """Mean over runs and tasks of max(gamma - score, 0): how far below `gamma` (normalized) scores fall.

    Lower is better; scores above `gamma` count as `gamma`. [..., runs, tasks] -> [...].
    """
    return np.maximum(gamma - _scores(scores), 0.0).mean(axis=(-2, -1))


METRICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": mean,
    "median": median,
    "iqm": iqm,
    "optimality_gap": optimality_gap,
}
"""The aggregates `interval_estimates` knows by name; each maps [..., runs, tasks] to [...]."""


# ---------------------------------------------------------------------------------------------
# Stratified bootstrap
# ---------------------------------------------------------------------------------------------


class Interval(NamedTuple):
    """A point estimate and its confidence interval."""

    estimate: float
    low: float
    high: float


def stratified_resample(scores: ArrayLike, reps: int, rng: np.random.Generator) -> np.ndarray:
    """[reps, runs, tasks] resamples of a [runs, tasks] matrix: runs drawn with replacement within each task."""
    x = _scores(scores)
    if x.ndim != 2:
        raise ConfigError(f"scores must be [runs] or [runs, tasks], got shape {x.shape}")
    runs, tasks = x.shape
    idx = rng.integers(0, runs, size=(reps, runs, tasks))
    # Flat indices into the row-major matrix: np.take is several times faster than x[idx, arange].
    return np.take(x.reshape(-1), idx * tasks + np.arange(tasks))


def _interval(estimate: np.ndarray, samples: np.ndarray, level: float, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) over the resample axis 0: percentile, or basic (reflected about the estimate)."""
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples, [alpha, 1.0 - alpha], axis=0)
    if method == "percentile":
        return lo, hi
    if method == "basic":
        return 2.0 * estimate - hi, 2.0 * estimate - lo
    raise ConfigError(f"unknown bootstrap method {method!r}; use 'percentile' or 'basic'")


def _check_level(level: float, reps: int) -> None:
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level must be between 0 and 1, got {level}")
    if reps < 1:
        raise ConfigError(f"reps must be a positive integer, got {reps}")


def interval_estimates(
    score_dict: Mapping[str, ArrayLike],
    metrics: Sequence[str] | Mapping[str, Callable[[np.ndarray], np.ndarray]] = tuple(METRICS),
    reps: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
    method: str = "percentile",
) -> pd.DataFrame:
    """Aggregate metrics of each algorithm's scores with stratified bootstrap confidence intervals.

    Args:
      score_dict: {algorithm: [runs, tasks] scores} (see `score_matrix`); runs may differ between
        algorithms. Normalize the scores first for `optimality_gap` (its gamma is 1).
      metrics: names from `METRICS`, or {name: fn} with fn mapping [..., runs, tasks] -> [...].
      reps: bootstrap resamples.
      level: confidence level of the intervals.
      seed: seed of the resampling; every algorithm uses its own generator seeded with it, so
        results do not depend on the dict's order.
      method: "percentile" (Agarwal et al.'s choice) or "basic".

    Returns:
      One row per (algo, metric): columns algo, metric, estimate, low, high.
    """
    _check_level(level, reps)
    if not isinstance(metrics, Mapping):
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ConfigError(f"unknown metric {unknown[0]!r}; use one of {', '.join(METRICS)}")
        metrics = {m: METRICS[m] for m in metrics}
    rows = []
    for algo, scores in score_dict.items():
        x = _scores(scores)
        samples = stratified_resample(x, reps, np.random.default_rng(seed))
        for name, fn in metrics.items():
            estimate = np.asarray(fn(x), np.float64)
            lo, hi = _interval(estimate, np.asarray(fn(samples), np.float64), level, method)
            rows.append((algo, name, float(estimate), float(lo), float(hi)))
    return pd.DataFrame(rows, columns=["algo", "metric", "estimate", "low", "high"])


def _improvement(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[B] P(X > Y) + P(X = Y)/2 per task, averaged over tasks, for x [B, n, tasks], y [B, m, tasks]."""
    xi, yj = x[:, :, None, :], y[:, None, :, :]
    wins = (xi > yj).mean(axis=(1, 2)) + 0.5 * (xi == yj).mean(axis=(1, 2))
    return wins.mean(axis=-1)


def probability_of_improvement(
    x: ArrayLike, y: ArrayLike, reps: int = 10_000, level: float = 0.95, seed: int = 0, method: str = "percentile"
) -> Interval:
    """P(X > Y): the probability that a run of X scores above a run of Y on a random task.

    Per task it is the Mann-Whitney U statistic over n m, U counting the pairs (x_i, y_j) with
    x_i > y_j and half of those with x_i = y_j; the tasks are averaged (Agarwal et al. 2021).

    Args:
      x: [n, tasks] scores of algorithm X; y: [m, tasks] of Y, on the same tasks.
      reps, level, seed, method: as for `interval_estimates`; x and y are resampled
        independently, each within its tasks.
    """
    _check_level(level, reps)
    x, y = _scores(x), _scores(y)
    if x.shape[-1] != y.shape[-1]:
        raise ConfigError(f"x and y must cover the same tasks, got {x.shape[-1]} and {y.shape[-1]} columns")
    estimate = _improvement(x[None], y[None])[0]
    rng = np.random.default_rng(seed)
    xs, ys = stratified_resample(x, reps, rng), stratified_resample(y, reps, rng)
    # The pairwise comparison is [reps, n, m, tasks]: done in blocks to bound memory.
    block = max(1, 2**22 // (x.shape[0] * y.shape[0] * x.shape[1]))
    samples = np.concatenate([_improvement(xs[i : i + block], ys[i : i + block]) for i in range(0, reps, block)])
    lo, hi = _interval(estimate, samples, level, method)
    return Interval(float(estimate), float(lo), float(hi))


class Profile(NamedTuple):
    """A performance profile: at each threshold tau, the fraction above it, with a confidence band."""

    taus: np.ndarray
    fraction: np.ndarray
    low: np.ndarray
    high: np.ndarray
    kind: str
    """"run": fraction of runs with score > tau; "average": fraction of tasks with mean score > tau."""


def _fraction_above(x: np.ndarray, taus: np.ndarray, kind: str) -> np.ndarray:
    """[B, K] fraction above each tau, for x [B, runs, tasks]."""
    if kind == "average":
        return (x.mean(axis=-2)[..., None] > taus).mean(axis=-2)
    # Run-score distribution: per task the fraction of runs, then averaged over tasks.
    return (x[..., None] > taus).mean(axis=(-3, -2))


def performance_profile(
    scores: ArrayLike,
    taus: ArrayLike | None = None,
    reps: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
    kind: str = "run",
) -> Profile:
    """The score distribution of one algorithm: the fraction of runs scoring above each tau.

    Args:
      scores: [runs, tasks] (normalized, to pool tasks).
      taus: thresholds; default 101 points spanning the scores.
      reps, level, seed: the stratified bootstrap of the band (percentile intervals).
      kind: "run" for the run-score distribution (per task the fraction of runs with score > tau,
        averaged over tasks), or "average" for the average-score distribution (the fraction of
        tasks whose mean score over runs is > tau).
    """
    _check_level(level, reps)
    if kind not in ("run", "average"):
        raise ConfigError(f"unknown profile kind {kind!r}; use 'run' or 'average'")
    x = _scores(scores)
    taus = np.linspace(x.min(), x.max(), 101) if taus is None else np.asarray(taus, np.float64).ravel()
    fraction = _fraction_above(x[None], taus, kind)[0]
    samples = stratified_resample(x, reps, np.random.default_rng(seed))
    block = max(1, 2**22 // (x.size * len(taus)))
    boot = np.concatenate([_fraction_above(samples[i : i + block], taus, kind) for i in range(0, reps, block)])
    lo, hi = _interval(fraction, boot, level, "percentile")
    return Profile(taus, fraction, lo, hi, kind)


def interval(
    scores: ArrayLike, metric: str = "iqm", reps: int = 10_000, level: float = 0.95, seed: int = 0,
    method: str = "percentile",
) -> Interval:  # fmt: skip
    """One metric of one algorithm's [runs, tasks] scores with its stratified bootstrap interval.

    The same as `interval_estimates({"": scores}, [metric], ...)`, as an `Interval`.
    """
    row = interval_estimates({"": scores}, [metric], reps, level, seed, method).iloc[0]
    return Interval(row["estimate"], row["low"], row["high"])


def curve_estimate(curves: ArrayLike, estimator: str = "mean") -> np.ndarray:
    """[T] `estimator` ("mean", "median" or "iqm") across runs of learning curves [..., runs, T], at each step."""
    if estimator not in ("mean", "median", "iqm"):
        raise ConfigError(f"unknown estimator {estimator!r}; use 'mean', 'median' or 'iqm'")
    # Each step is a one-task score matrix [runs, 1].
    return METRICS[estimator](np.swapaxes(np.asarray(curves, np.float64), -1, -2)[..., None])


def curve_intervals(
    curves: ArrayLike, estimator: str = "mean", reps: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(estimate, low, high), each [T], of learning curves [runs, T] across runs at every step.

    Whole curves are resampled (a run keeps its curve, so the band is one bootstrap of runs, not
    one per step), and `estimator` is taken across runs at each step; percentile intervals.
    """
    _check_level(level, reps)
    y = np.asarray(curves, np.float64)
    estimate = curve_estimate(y, estimator)
    rng = np.random.default_rng(seed)
    samples = curve_estimate(y[rng.integers(0, y.shape[0], size=(reps, y.shape[0]))], estimator)
    lo, hi = _interval(estimate, samples, level, "percentile")
    return estimate, lo, hi


# ---------------------------------------------------------------------------------------------
# From the tidy table to score matrices
# ---------------------------------------------------------------------------------------------


def score_matrix(
    final: pd.DataFrame,
    by: str | Sequence[str] = "algo",
    normalize: bool = False,
    tasks: Sequence[str] | None = None,
    score: str = "final_return",
) -> dict[Any, np.ndarray]:
    """{group: [runs, tasks] scores} from `final_scores`'s table, tasks being envs.

    Args:
      final: `final_scores(load(...))`.
      by: the column(s) naming a group, e.g. "algo", "run", or ["algo", "lr"]; a key is the
        value, or a tuple of values for several columns.
      normalize: map each env's scores through `REFERENCE_SCORES`.
      tasks: the envs, in column order; default all envs in `final`, sorted by name.
      score: the column holding the scores.

    Every run of a group on an env (every run folder, grid point and seed in it) is one row.
    Where a group has more runs on one env than on another, each env keeps its first k runs
    (by path, point, seed), k the smallest count, with a warning: the matrix must be rectangular
    and the stratified bootstrap then weighs every task alike.

    Raises:
      ConfigError: a group has no run on one of the tasks, or normalize on an env missing from
        `REFERENCE_SCORES`.
    """
    by = [by] if isinstance(by, str) else list(by)
    tasks = sorted(final["env"].unique()) if tasks is None else list(tasks)
    if normalize:
        unknown = [t for t in tasks if t not in REFERENCE_SCORES]
        if unknown:
            raise ConfigError(f"no reference scores for {unknown[0]} to normalize by; pass normalize=False")
    out = {}
    ordered = final.sort_values(["path", "point", "seed"], kind="stable")
    for keys, group in ordered.groupby(by, sort=True, dropna=False):
        key = keys[0] if len(by) == 1 else keys
        columns = []
        for task in tasks:
            values = group.loc[group["env"] == task, score].to_numpy(np.float64)
            if len(values) == 0:
                raise ConfigError(f"{'/'.join(by)} {key} has no runs on {task}; pass tasks= the envs all groups share")
            columns.append(values)
        k = min(len(c) for c in columns)
        if any(len(c) > k for c in columns):
            counts = ", ".join(f"{t}: {len(c)}" for t, c in zip(tasks, columns, strict=True))
            warnings.warn(f"{key}: unequal runs per env ({counts}); keeping the first {k} of each", stacklevel=2)
        matrix = np.stack([c[:k] for c in columns], axis=1)
        if normalize:
            low, high = zip(*(REFERENCE_SCORES[t] for t in tasks), strict=True)
            matrix = _normalize(matrix, low, high)
        out[key] = matrix
    return out


# ---------------------------------------------------------------------------------------------
# The comparison table of `kl-rl compare`
# ---------------------------------------------------------------------------------------------


class Comparison(NamedTuple):
    """What `compare` gives: per (group, env) the IQM of the final returns, and per ordered pair
    of groups the probability of improvement over the envs both ran."""

    cells: pd.DataFrame
    """Columns `group`, `env`, `runs` (finite final returns), `dropped` (runs whose final return
    is not finite: diverged seeds), `iqm`, `low`, `high`: `interval` of the cell's runs as a
    one-task score matrix."""
    pairs: pd.DataFrame
    """Columns `x`, `y`, `envs` (the envs both ran, sorted), `p`, `low`, `high`:
    `probability_of_improvement(X, Y)` on `score_matrix`'s [runs, envs] matrices of those envs;
    every ordered pair of distinct groups, so P(X > Y) + P(Y > X) = 1 (ties count half each way)."""


def evaluated_scores(final: pd.DataFrame, name: str) -> pd.DataFrame:
    """`final` with each run's `final_return` replaced by its `eval/<name>.json` (`kl-rl eval
    --name NAME`): per seed, the mean return of that evaluation. Seeds the evaluation left out
    are dropped; `update` becomes the evaluated checkpoint's.

    Raises:
      ConfigError: a run folder without that file, or a file that is not an evaluation.
    """
    parts = []
    for path, run in final.groupby("path", sort=False):
        file = Path(path) / "eval" / f"{name}.json"
        if not file.is_file():
            raise ConfigError(f"{path} has no eval/{name}.json; write it with kl-rl eval {path} --name {name}")
        record = _read_json(file)
        if not isinstance(record.get("seeds"), list) or not isinstance(record.get("return"), list):
            raise ConfigError(f"{file} is not a kl-rl eval file (no seeds and return lists)")
        returns = dict(zip(record["seeds"], record["return"], strict=False))
        rows = run[run["seed"].isin(list(returns))].copy()
        rows["final_return"] = [np.nan if returns[s] is None else float(returns[s]) for s in rows["seed"]]
        rows["update"] = record.get("update", np.nan)
        parts.append(rows)
    return pd.concat(parts, ignore_index=True)


def compare(
    final: pd.DataFrame, by: str = "algo", reps: int = 10_000, level: float = 0.95, seed: int = 0
) -> Comparison:
    """The algorithm x env table rliable users read: IQM with its stratified bootstrap CI per
    cell, and the probability of improvement between each pair (Agarwal et al. 2021,
    arXiv:2108.13264), on raw (unnormalized) final returns.

    Args:
      final: `final_scores(load(...))` of train run folders.
      by: "algo" (an algorithm's folders on one env pooled as its runs there) or "run" (each
        folder its own row).
      reps, level, seed: the bootstrap, as in `interval_estimates`.

    Raises:
      ConfigError: a sweep folder among the runs (its points would pool), an unknown `by`, or
        groups that share no env.
    """
    if by not in ("algo", "run"):
        raise ConfigError(f"unknown grouping {by!r}; use 'algo' or 'run'")
    sweeps = final.loc[final["kind"] != "train", "run"].unique()
    if len(sweeps):
        raise ConfigError(
            f"{sweeps[0]} is a sweep folder; compare takes train run folders (compare a sweep's points with "
            "kl-rl plot or analysis.interval_estimates)"
        )
    finite = final[np.isfinite(final["final_return"].to_numpy(np.float64))]
    groups = list(dict.fromkeys(final[by]))
    envs = sorted(final["env"].unique())
    cells = []
    for group in groups:
        for env in envs:
            here = final[(final[by] == group) & (final["env"] == env)]
            if here.empty:
                continue
            scores = here["final_return"].to_numpy(np.float64)
            kept = scores[np.isfinite(scores)]
            est = interval(kept, "iqm", reps, level, seed) if len(kept) else Interval(np.nan, np.nan, np.nan)
            cells.append((group, env, len(kept), len(scores) - len(kept), *est))
    pairs = []
    for x in groups:
        for y in groups:
            if x == y:
                continue
            shared = sorted(set(finite.loc[finite[by] == x, "env"]) & set(finite.loc[finite[by] == y, "env"]))
            if not shared:
                continue
            both = finite[finite[by].isin([x, y])]
            matrices = score_matrix(both, by=by, tasks=shared)
            est = probability_of_improvement(matrices[x], matrices[y], reps, level, seed)
            pairs.append((x, y, shared, *est))
    if len(groups) > 1 and not pairs:
        raise ConfigError(f"the {by}s given share no env with finite returns; compare runs on a common env")
    cells_df = pd.DataFrame(cells, columns=["group", "env", "runs", "dropped", "iqm", "low", "high"])
    pairs_df = pd.DataFrame(pairs, columns=["x", "y", "envs", "p", "low", "high"])
    return Comparison(cells_df, pairs_df)
