"""Figures of runs and sweeps: learning curves, KL, the return-KL trade-off, interval estimates and
performance profiles (the last two as in Agarwal et al. 2021, "Deep RL at the Edge of the
Statistical Precipice").

    >>> df = analysis.load("runs/sweep-ppo-CartPole-v1")
    >>> fig = plots.learning_curves(df, hue="lr")       # mean over seeds with a 95% bootstrap band
    >>> plots.save(fig, "plots/learning_curves")        # plots/learning_curves.png and .svg

Every function returns a `matplotlib.figure.Figure` built without pyplot, so nothing here selects
or changes a matplotlib backend: notebooks keep theirs, and a headless machine needs none to save.
`figures(df)` makes the figures that fit what is loaded; `kl-rl plot` writes them.

Needs the analysis extra: pip install 'kl_rl[analysis]'.
"""

import dataclasses
import functools
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kl_rl import analysis  # first: it reports a missing pandas as a ConfigError
from kl_rl.errors import ConfigError

import pandas as pd

try:
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter
except ImportError as err:
    raise ConfigError("kl_rl.plots needs matplotlib: pip install 'kl_rl[analysis]'") from err

COLORS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
"""Okabe and Ito's colorblind-safe palette (yellow last: it is faint on white)."""
_LINESTYLES = ("-", "--", ":", "-.")  # past eight lines, colors repeat with another dash

STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "legend.title_fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "svg.hashsalt": "kl_rl",  # stable element ids, so an unchanged figure saves to the same SVG
}
"""matplotlib settings the figures are drawn under (only while drawing; rcParams stay as they are)."""

LABELS = {
    "env_steps": "env steps",
    "wall_time_s": "wall time (s, compilation excluded)",
    "update": "update",
    "episode_return": "episode return",
    "eval_return": "evaluation return",
    "final_return": "final return",
    "kl": "KL per update (nats)",
    "entropy": "entropy (nats)",
}
METRIC_TITLES = {"mean": "Mean", "median": "Median", "iqm": "IQM", "optimality_gap": "Optimality gap"}
_ESTIMATORS = {"mean": "mean", "median": "median", "iqm": "IQM"}
_ID_HUES = ("run", "algo", "env", "path", "kind", "config")  # hue columns shown by value alone, not name=value


def _styled(fn: Callable[..., Figure]) -> Callable[..., Figure]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def _label_of(column: str) -> str:
    return LABELS.get(column, column.replace("_", " "))


def _fmt(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"
    return str(value)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float | np.floating) and math.isnan(value))


def _hue_label(columns: Sequence[str], values: Sequence[Any]) -> str:
    """'ppo' for hue algo; 'lr=0.001, clip_eps=0.2' for hyperparameters; missing values left out."""
    parts = [
        _fmt(v) if c in _ID_HUES else f"{c}={_fmt(v)}" for c, v in zip(columns, values, strict=True) if not _missing(v)
    ]
    return ", ".join(parts) or "n/a"


def _hue_columns(hue: str | Sequence[str]) -> list[str]:
    return [hue] if isinstance(hue, str) else list(hue)


def _require(df: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in df]
    if missing:
        raise ConfigError(f"the table has no {missing[0]!r} column; columns: {', '.join(map(str, df.columns))}")


def _groups(df: pd.DataFrame, hue_cols: list[str]) -> dict[str, pd.DataFrame]:
    """{label: rows} per hue value, in sorted order of the values (missing last)."""
    keys = df[hue_cols].drop_duplicates().sort_values(hue_cols, na_position="last", kind="stable")
    out: dict[str, list[pd.DataFrame]] = {}
    for values, rows in df.groupby(hue_cols, sort=False, dropna=False):
        out.setdefault(_hue_label(hue_cols, values), []).append(rows)
    order = [_hue_label(hue_cols, tuple(k)) for k in keys.itertuples(index=False)]
    return {label: pd.concat(out[label]) for label in dict.fromkeys(order)}


def _styles(labels: Sequence[str]) -> dict[str, tuple[str, str]]:
    """(color, linestyle) per label, by position."""
    n = len(COLORS)
    return {label: (COLORS[i % n], _LINESTYLES[(i // n) % len(_LINESTYLES)]) for i, label in enumerate(labels)}


def _curve_matrix(rows: pd.DataFrame, x: str, y: str, num_points: int, label: str) -> tuple[np.ndarray, np.ndarray]:
    """(x grid [T], curves [runs, T]): one curve per (folder, point, seed).

    Curves sharing their x values keep them; otherwise each is interpolated linearly onto
    `num_points` points over the x range all of them cover.
    """
    curves = []
    for _, run in rows.groupby(["path", "point", "seed"], sort=True):
        xy = run[[x, y]].dropna().sort_values(x)
        if len(xy):
            curves.append((xy[x].to_numpy(np.float64), xy[y].to_numpy(np.float64)))
    if not curves:
        raise ConfigError(f"{label} has no {x!r} and {y!r} values to plot")
    first = curves[0][0]
    if all(len(cx) == len(first) and np.allclose(cx, first) for cx, _ in curves):
        return first, np.stack([cy for _, cy in curves])
    lo, hi = max(cx[0] for cx, _ in curves), min(cx[-1] for cx, _ in curves)
    if hi <= lo:
        raise ConfigError(f"the curves of {label} cover no common {x} range; choose a hue that separates them")
    grid = np.linspace(lo, hi, num_points)
    return grid, np.stack([np.interp(grid, cx, cy) for cx, cy in curves])


@dataclasses.dataclass(frozen=True)
class Band:
    """How the curve plots summarise seeds: their `**band` keywords (`learning_curves`, `kl_curves`)."""

    estimator: str = "mean"
    """"mean", "median" or "iqm" across seeds at each x."""
    ci: float | None = 0.95
    """Level of the bootstrap band over seeds (whole curves resampled); None for no band."""
    reps: int = 1000
    """Bootstrap resamples of the band."""
    seed: int = 0
    """Seed of the bootstrap."""
    num_points: int = 200
    """x points where seeds' x values differ (wall time across programs) and the curves are
    interpolated onto a common grid."""

    @property
    def title(self) -> str:
        what = f"{_ESTIMATORS.get(self.estimator, self.estimator)} over seeds"
        return what + (f", {self.ci:.0%} bootstrap CI" if self.ci else "")


def _draw_curves(
    ax: Any, rows: pd.DataFrame, x: str, y: str, hue_cols: list[str], styles: dict[str, tuple[str, str]], band: Band
) -> None:
    """One line per hue value in `rows`: the band's estimator over seeds, with its bootstrap band."""
    for label, group in _groups(rows, hue_cols).items():
        color, linestyle = styles[label]
        grid, curves = _curve_matrix(group, x, y, band.num_points, label)
        if band.ci and len(curves) > 1:
            estimate, lo, hi = analysis.curve_intervals(curves, band.estimator, band.reps, band.ci, band.seed)
            ax.fill_between(grid, lo, hi, color=color, alpha=0.2, linewidth=0)
        else:
            estimate = analysis.curve_estimate(curves, band.estimator)
        ax.plot(grid, estimate, color=color, linestyle=linestyle, linewidth=1.6, label=label)
    if x in ("env_steps", "update"):
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel(_label_of(x))


def _legend(fig: Figure, title: str) -> None:
    """One legend for the figure, outside the panels, of every labelled line once."""
    handles: dict[str, Any] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if not line.get_label().startswith("_"):
                handles.setdefault(line.get_label(), line)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper", title=title)


def _panels(df: pd.DataFrame, col: str | None) -> list[tuple[str, pd.DataFrame]]:
    if col is None:
        return [("", df)]
    return [(str(v), df[df[col] == v]) for v in sorted(df[col].dropna().unique(), key=str)]




@_styled
def learning_curves(
    df: pd.DataFrame,
    x: str = "env_steps",
    y: str = "episode_return",
    hue: str | Sequence[str] = "algo",
    col: str | None = "env",
    **band: Any,
) -> Figure:
    """Training curves: `estimator` over seeds of `y` against `x`, one line per hue value, one panel per `col`.

    Args:
      df: `analysis.load`'s table.
      x: "env_steps", "wall_time_s" or "update".
      y: a metric column, e.g. "episode_return" (the training episodes' mean return per update).
      hue: the column(s) telling lines apart: "algo", "run", a hyperparameter, or several.
      col: the column telling panels apart (None: one panel).
      **band: `Band`'s fields: estimator ("mean", "median" or "iqm" across seeds at each x), ci
        (the bootstrap band's level; None for none), reps, seed and num_points.
    """
    spec = Band(**band)
    hue_cols = _hue_columns(hue)
    _require(df, [x, y, *hue_cols, *([col] if col else [])])
    panels = _panels(df, col)
    styles = _styles(list(_groups(df, hue_cols)))
    fig = Figure(figsize=(3.8 * len(panels) + 2.2, 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, rows) in zip(axes, panels, strict=True):
        _draw_curves(ax, rows, x, y, hue_cols, styles, spec)
        ax.set_title(title)
    axes[0].set_ylabel(f"{_label_of(y)}\n{spec.title}")
    _legend(fig, ", ".join(hue_cols))
    return fig


@_styled
def kl_curves(
    df: pd.DataFrame,
    x: str = "env_steps",
    hue: str | Sequence[str] = "algo",
    col: str | None = "env",
    y: str = "episode_return",
    kl: str = "kl",
    **band: Any,
) -> Figure:
    """Return (top row) and KL per update (bottom row, log scale) over training, one column per `col`.

    `kl` is the metric column: PPO's and VPG's KL between the policies before and after an
    update, TRPO's accepted step's KL, CEM's between successive search distributions. The
    other arguments are `learning_curves`'s.
    """
    spec = Band(**band)
    hue_cols = _hue_columns(hue)
    _require(df, [x, y, kl, *hue_cols, *([col] if col else [])])
    panels = _panels(df, col)
    styles = _styles(list(_groups(df, hue_cols)))
    fig = Figure(figsize=(3.8 * len(panels) + 2.2, 5.6), layout="constrained")
    axes = fig.subplots(2, len(panels), squeeze=False, sharex="col")
    for j, (title, rows) in enumerate(panels):
        for i, metric in enumerate((y, kl)):
            _draw_curves(axes[i, j], rows, x, metric, hue_cols, styles, spec)
        axes[0, j].set_title(title)
        axes[0, j].set_xlabel("")
        if (rows[kl] > 0).any():
            axes[1, j].set_yscale("log", nonpositive="mask")
    axes[0, 0].set_ylabel(f"{_label_of(y)}\n{spec.title}")
    axes[1, 0].set_ylabel(_label_of(kl) + (", log scale" if axes[1, 0].get_yscale() == "log" else ""))
    _legend(fig, ", ".join(hue_cols))
    return fig


@_styled
def return_kl_tradeoff(
    df: pd.DataFrame,
    param: str,
    kl: str = "kl",
    hue: str | Sequence[str] = "run",
    col: str | None = "env",
    estimator: str = "iqm",
    level: float = 0.95,
    reps: int = 2000,
    seed: int = 0,
) -> Figure:
    """Final return against mean KL per update, one point per configuration, labelled by `param`.

    For a sweep over a KL-related hyperparameter (kl_coef, target_kl, max_kl, clip_eps, ...):
    each grid point is a marker at (the mean over seeds of each seed's mean KL per update,
    `estimator` over seeds of the final return), with `level` stratified bootstrap intervals on
    both axes. The points sharing a hue value and the other swept hyperparameters are one
    series, joined in order of `param`. Rows without a value of `param` (train runs, other
    sweeps) are left out.

    Raises:
      ConfigError: no loaded sweep varies `param`.
    """
    hue_cols = _hue_columns(hue)
    _require(df, [param, kl, *hue_cols, *([col] if col else [])])
    rows = df[df[param].notna()]
    if rows.empty:
        raise ConfigError(f"no loaded sweep varies {param!r}; sweep it with kl-rl sweep --grid {param}=V1,V2,...")
    final = analysis.final_scores(rows).set_index(["path", "point", "seed"])["final_return"]
    others = [h for h in analysis.hyperparameters(rows) if h != param and rows[h].nunique() > 1]
    series_cols = [*hue_cols, *others]
    panels = _panels(rows, col)
    styles = _styles(list(_groups(rows, series_cols)))
    fig = Figure(figsize=(4.6 * len(panels) + 2.2, 3.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, panel) in zip(axes, panels, strict=True):
        for label, group in _groups(panel, series_cols).items():
            color, _ = styles[label]
            points = []
            for (path, point), config in group.groupby(["path", "point"], sort=False):
                kls = config.groupby("seed")[kl].mean()
                returns = final.loc[(path, point)].reindex(kls.index).to_numpy()
                x = analysis.interval(kls.to_numpy(), "mean", reps, level, seed)
                y = analysis.interval(returns, estimator, reps, level, seed)
                points.append((config[param].iloc[0], x, y))
            points.sort(key=lambda p: p[0])
            xs, ys = np.array([p[1] for p in points]), np.array([p[2] for p in points])
            ax.errorbar(
                xs[:, 0], ys[:, 0],
                xerr=[xs[:, 0] - xs[:, 1], xs[:, 2] - xs[:, 0]], yerr=[ys[:, 0] - ys[:, 1], ys[:, 2] - ys[:, 0]],
                fmt="o-", color=color, markersize=5, linewidth=1.0, capsize=3, label=label,
            )  # fmt: skip
            for value, x, y in points:
                ax.annotate(_fmt(value), (x[0], y[0]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        if (panel[kl] > 0).all():
            ax.set_xscale("log")
        ax.set_title(title)
        ax.set_xlabel("mean " + _label_of(kl) + (", log scale" if ax.get_xscale() == "log" else ""))
    axes[0].set_ylabel(f"final return ({_ESTIMATORS.get(estimator, estimator)} over seeds)")
    fig.suptitle(f"final return vs KL as {param} varies (points labelled by {param}; {level:.0%} bootstrap CIs)")
    if len(styles) > 1:
        axes[-1].legend(title=", ".join(series_cols))
    return fig


@_styled
def interval_estimates_plot(estimates: pd.DataFrame, xlabel: str = "normalized score") -> Figure:
    """Agarwal et al.'s interval plot: a panel per metric, per algorithm a bar over its CI and a tick at the estimate.

    Args:
      estimates: `analysis.interval_estimates`'s table (algo, metric, estimate, low, high).
      xlabel: the scores' unit.
    """
    _require(estimates, ["algo", "metric", "estimate", "low", "high"])
    metrics = list(dict.fromkeys(estimates["metric"]))
    algos = list(dict.fromkeys(estimates["algo"]))
    colors = {a: c for a, (c, _) in _styles(algos).items()}
    fig = Figure(figsize=(2.6 * len(metrics) + 1.4, 0.45 * len(algos) + 1.5), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False, sharey=True)[0]
    by_key = estimates.set_index(["algo", "metric"])
    for ax, metric in zip(axes, metrics, strict=True):
        for i, algo in enumerate(algos):
            if (algo, metric) not in by_key.index:
                continue
            row = by_key.loc[(algo, metric)]
            ax.barh(i, row["high"] - row["low"], left=row["low"], height=0.6, color=colors[algo], alpha=0.75)
            ax.vlines(row["estimate"], i - 0.3, i + 0.3, color="black", linewidth=1.5)
        ax.set_title(METRIC_TITLES.get(metric, metric))
        ax.set_xlabel(xlabel)
        ax.grid(axis="y", visible=False)
    axes[0].set_yticks(range(len(algos)), [str(a) for a in algos])
    axes[0].set_ylim(len(algos) - 0.5, -0.5)  # the first algorithm on top
    return fig


@_styled
def performance_profile_plot(profiles: Mapping[str, analysis.Profile], xlabel: str = "normalized score τ") -> Figure:
    """Score distributions (performance profiles) with their bootstrap bands, one line per algorithm.

    Args:
      profiles: {algo: `analysis.performance_profile(...)`}, best on shared taus.
      xlabel: the scores' unit.
    """
    fig = Figure(figsize=(5.6, 3.8), layout="constrained")
    ax = fig.subplots()
    kinds = set()
    for (name, profile), (color, linestyle) in zip(profiles.items(), _styles(list(profiles)).values(), strict=True):
        ax.fill_between(profile.taus, profile.low, profile.high, color=color, alpha=0.2, linewidth=0)
        ax.plot(profile.taus, profile.fraction, color=color, linestyle=linestyle, linewidth=1.6, label=str(name))
        kinds.add(profile.kind)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"fraction of {'tasks with mean' if kinds == {'average'} else 'runs with'} score > τ")
    ax.set_ylim(0.0, 1.02)
    ax.set_title("score distributions (bands: bootstrap CIs)")
    ax.legend()
    return fig


def save(fig: Figure, path: str | os.PathLike) -> list[Path]:
    """Writes `path`.png (150 dpi) and `path`.svg, each atomically (a temporary file renamed over it).

    Returns:
      The two files written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt, metadata in (("png", {}), ("svg", {"Date": None})):
        # Appended, not with_suffix: a name may hold dots (lr=0.001).
        final = path.with_name(f"{path.name}.{fmt}")
        tmp = path.with_name(f".{final.name}.{os.getpid()}.tmp")
        try:
            with matplotlib.rc_context(STYLE):
                fig.savefig(tmp, format=fmt, dpi=150, metadata=metadata)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(final)
    return written


def _with_config(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with a `config` column naming each line of kl-rl plot's curves.

    A train run is named by its algo when every (algo, env) has one train run, else by its run
    folder; a grid point by its swept values ('lr=0.001'), after its sweep's folder name when
    more than one folder is plotted.
    """
    train = df["kind"] == "train"
    one_per_algo = not df[train].groupby(["algo", "env"])["path"].nunique().gt(1).any()
    names = df["algo"].where(train & one_per_algo, df["run"])
    columns = ["run", *analysis.hyperparameters(df)] if df["path"].nunique() > 1 else analysis.hyperparameters(df)
    points = pd.Series([_hue_label(columns, v) for v in df[columns].itertuples(index=False)], index=df.index)
    return df.assign(config=names.where(train, points))


def _finite_runs(df: pd.DataFrame, log: Callable[[str], None]) -> pd.DataFrame:
    """`df` without the runs (a folder's (point, seed)) that went non-finite, each named through `log`.

    A diverged run's rows end at its first non-finite update (`nonfinite` set there), and its
    curves would end in nan; the finite runs are drawn without it.

    Raises:
      ConfigError: every run diverged, so nothing is left to draw.
    """
    if "nonfinite" not in df:
        return df
    keys = ["path", "point", "seed"]
    bad = df.groupby(keys, sort=True, dropna=False)["nonfinite"].max().gt(0)
    if not bad.any():
        return df
    dropped = bad[bad].index
    for path, point, seed in dropped:
        rows = df[(df["path"] == path) & (df["point"].eq(point) | (df["point"].isna() & pd.isna(point)))
                  & (df["seed"] == seed)]  # fmt: skip
        update = int(rows.loc[rows["nonfinite"].gt(0), "update"].min())
        log(f"left out {rows['config'].iloc[0]} seed {seed} of {path}: diverged at update {update}")
    keep = ~df.set_index(keys).index.isin(dropped)
    if not keep.any():
        raise ConfigError("every run of these folders diverged (non-finite values); there is nothing to plot")
    return df[keep]


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


def figures(df: pd.DataFrame, log: Callable[[str], None] | None = None) -> Iterator[tuple[str, Figure]]:
    """(file name, figure) for each figure that fits the loaded folders: what `kl-rl plot` writes.

    Args:
      df: `analysis.load`'s table of run and sweep folders.
      log: optional function receiving a line when train runs of several algorithms share no env,
        so no comparison figures are made.
    """
    log = log or (lambda line: None)
    df = _finite_runs(_with_config(df), log)
    hue = ["config"]
    yield "learning_curves", learning_curves(df, hue=hue)
    if df["wall_time_s"].notna().any():
        yield "learning_curves_wall_time", learning_curves(df.dropna(subset=["wall_time_s"]), x="wall_time_s", hue=hue)
    has_kl = "kl" in df and df["kl"].notna().any()
    if has_kl:
        yield "kl_curves", kl_curves(df, hue=hue)
    sweeps = df[df["kind"] == "sweep"]
    for run, sweep in sweeps.groupby("run", sort=True):
        prefix = "" if sweeps["run"].nunique() == 1 else f"{_file_name(run)}_"
        grid = [h for h in analysis.hyperparameters(df) if sweep[h].notna().all()]
        if df["path"].nunique() > 1:  # alone, the sweep's learning_curves are already by config
            yield f"{prefix}learning_curves_by_config", learning_curves(sweep, hue=grid)
        numeric = [
            h for h in grid
            if pd.api.types.is_numeric_dtype(sweep[h]) and not pd.api.types.is_bool_dtype(sweep[h])
            and sweep[h].nunique() > 1
        ]  # fmt: skip
        if numeric and has_kl:
            param = numeric[0]
            yield f"{prefix}return_kl_tradeoff_{_file_name(param)}", return_kl_tradeoff(sweep, param)
    runs = df[df["kind"] == "train"]
    if runs["algo"].nunique() > 1:
        yield from _comparison_figures(analysis.final_scores(runs), log)


def _comparison_figures(final: pd.DataFrame, log: Callable[[str], None]) -> Iterator[tuple[str, Figure]]:
    """Interval estimates and performance profiles of the algorithms' final returns on their shared envs.

    Train runs only (a sweep's grid points are configurations, not seeds); the run folders of one
    algorithm on one env are pooled as its runs there.
    """
    shared = sorted(set.intersection(*(set(envs) for _, envs in final.groupby("algo")["env"])))
    if not shared:
        log("no env is shared by all algorithms: no interval estimates or performance profiles")
        return
    normalize = all(env in analysis.REFERENCE_SCORES for env in shared)
    scores = analysis.score_matrix(final[final["env"].isin(shared)], by="algo", normalize=normalize, tasks=shared)
    # The optimality gap's threshold (1) is a normalized score.
    metrics = ["mean", "median", "iqm", *(["optimality_gap"] if normalize else [])]
    unit = "normalized score" if normalize else "final return"
    yield "interval_estimates", interval_estimates_plot(analysis.interval_estimates(scores, metrics), unit)
    pooled = np.concatenate([s.ravel() for s in scores.values()])
    taus = np.linspace(pooled.min(), pooled.max(), 101)
    profiles = {algo: analysis.performance_profile(s, taus) for algo, s in scores.items()}
    yield "performance_profile", performance_profile_plot(profiles, f"{unit} τ")
