"""Weights & Biases logging of finished runs, sweeps and tuning studies (the `wandb` extra).

Like the TensorBoard files (`kl_rl.runfolder.RunResult.write_tensorboard`), the logs are written
on the host once training is over, from the same arrays as metrics.csv: nothing in the compiled
program changes. A seed is one W&B run; the seeds of a run folder form a W&B group named after
the folder. A sweep's grid point and a tuning trial each form a group of their own
(`<folder>-point<p>`, `<folder>-trial<n>`). Each seed's run holds:

- its config: the run's config (the point's or trial's values over it) and its seed;
- one history row per update (W&B's `_step` is the update, 1-based, as metrics.csv counts it):
  every metric as `train/<name>`, `env_steps`, and `eval/return` at evaluation points and at the
  final update; a value that is NaN (no episode has ended yet) is left out, as metrics.csv leaves
  its cell empty, and a seed that diverged stops at its first non-finite update, as its rows do;
- its summary: its own final return and divergence, beside the run's, point's or trial's
  statistics (median, IQM, ...).

With WANDB_MODE=offline (or `wandb offline`) no network and no account are needed: the runs are
written under ./wandb (or $WANDB_DIR), and `wandb sync wandb/offline-run-*` uploads them later.

    >>> result = kl_rl.run("ppo", "CartPole-v1", seeds=4, total_steps=50_000)
    >>> result.save("runs/ppo-cartpole")
    >>> kl_rl.logging_wandb.log_run(result, project="kl-rl", group="ppo-cartpole")
"""

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from kl_rl.divergence import first_nonfinite
from kl_rl.errors import ConfigError

_BAD_PROJECT_CHARS = set("/\\#?%:")
"""Characters W&B refuses in a project name."""
VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".ogg")
"""The video files W&B plays (`wandb.Video`)."""
_KEYS = {"env_steps": "env_steps", "eval_return": "eval/return"}
"""History keys of the metrics not logged as `train/<name>`."""


def require_wandb() -> Any:
    """The wandb module, or a ConfigError naming the extra to install."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "{wandb} needs the wandb package; install it with pip install 'kl_rl[wandb]'", "wandb"
        ) from None
    return wandb


def check(project: str) -> Any:
    """Everything that can be checked before training: wandb installs, the project name is one
    W&B takes, and in online mode W&B has an API key (read locally: nothing goes over the network).

    Returns:
      The wandb module.

    Raises:
      ConfigError: the wandb package is missing, the name is empty or holds / \\ # ? % :, or W&B
        is online with no API key configured.
    """
    wandb = require_wandb()
    if not project or len(project) > 128 or _BAD_PROJECT_CHARS & set(project):
        raise ConfigError(
            f"{{wandb}} takes a W&B project name of 1 to 128 characters without / \\ # ? % :, got {project!r}",
            "wandb",
        )
    mode = wandb.setup().settings.mode
    if mode not in ("offline", "dryrun", "disabled") and not wandb.login(verify=False, prompt=False):
        raise ConfigError(
            "{wandb} logs online but W&B has no API key; run wandb login (or set WANDB_API_KEY), "
            "or set WANDB_MODE=offline to log locally and wandb sync later",
            "wandb",
        )
    return wandb


def history(
    metrics: dict[str, np.ndarray], final_return: float | None, num_updates: int | None = None
) -> list[dict[str, float]]:
    """One seed's W&B history rows, one per update: what its metrics.csv rows hold.

    Args:
      metrics: {name: [updates]} of one seed (`eval_return`, where present, holds the evaluation
        points, NaN between them).
      final_return: the seed's mean final evaluation return, logged as `eval/return` at the
        last update; None for a seed that diverged.
      num_updates: the updates the seed ran (default: the arrays' length); a sweep's arrays are
        NaN-padded past it.

    Returns:
      [{"env_steps", "train/<name>", "eval/return"?}] for every update, or up to the first
      non-finite one (included) for a seed that diverged; NaN values are left out.
    """
    num_updates = num_updates or len(metrics["env_steps"])
    trimmed = {k: np.asarray(v)[:num_updates] for k, v in metrics.items()}
    (diverged,) = first_nonfinite({k: v[None] for k, v in trimmed.items()})
    rows = []
    for u in range(diverged or num_updates):
        row = {}
        for name, values in sorted(trimmed.items()):
            value = float(values[u])
            if not math.isnan(value):
                row[_KEYS.get(name, f"train/{name}")] = value
        if u == num_updates - 1 and diverged is None and final_return is not None:
            row["eval/return"] = float(final_return)
        rows.append(row)
    return rows


def log_seeds(
    project: str,
    group: str,
    config: dict[str, Any],
    seeds: Sequence[int],
    metrics: dict[str, np.ndarray],
    final_returns: Sequence[float | None],
    summary: dict[str, Any],
    job_type: str = "train",
    num_updates: int | None = None,
) -> list[str]:
    """Logs one W&B run per seed into `group`: config, history (`history`) and summary.

    Args:
      project: the W&B project (the entity is W&B's default, or $WANDB_ENTITY).
      group: the W&B group the seeds' runs join.
      config: the config every seed's run records, with its `seed` added.
      seeds: the seeds, in the order of the metrics' first axis.
      metrics: {name: [seeds, updates]}.
      final_returns: per seed, its final return, or None (diverged, not evaluated).
      summary: what every seed's summary records beside its own `final_return` and `diverged`.
      job_type: W&B's job type ("train", "sweep", "tune").
      num_updates: the updates run (default: the arrays' length).

    Returns:
      The W&B run ids, one per seed.
    """
    wandb = require_wandb()
    num_updates = num_updates or metrics["env_steps"].shape[1]
    diverged = first_nonfinite({k: np.asarray(v)[:, :num_updates] for k, v in metrics.items()})
    ids = []
    for s, seed in enumerate(seeds):
        rows = history({k: v[s] for k, v in metrics.items()}, final_returns[s], num_updates)
        run = wandb.init(
            project=project, group=group, name=f"{group}-seed{seed}", job_type=job_type,
            config={**_jsonable(config), "seed": int(seed)}, reinit="create_new",
            settings=wandb.Settings(console="off"),
        )  # fmt: skip
        try:
            run.define_metric("env_steps")
            for pattern in ("train/*", "eval/*"):
                run.define_metric(pattern, step_metric="env_steps")
            for update, row in enumerate(rows, 1):
                run.log(row, step=update)
            run.summary.update({**_jsonable(summary), "final_return": final_returns[s], "diverged": diverged[s]})
            ids.append(run.id)
        finally:
            run.finish()
    return ids


def log_run(result: Any, project: str, group: str) -> list[str]:
    """Logs a `kl_rl.runfolder.RunResult`: one W&B run per seed in `group` (the run folder's name).

    Returns:
      The W&B run ids, one per seed.
    """
    summary = result.summary()
    per_seed = {"seeds", "final_return", "diverged"}
    return log_seeds(
        project, group, result.config_dict(), result.seeds, result.metrics, summary["final_return"],
        {k: v for k, v in summary.items() if k not in per_seed},
    )  # fmt: skip


def log_sweep(result: Any, project: str, folder: str, base_config: dict[str, Any] | None = None) -> list[str]:
    """Logs a `kl_rl.sweep.SweepResult`: grid point p is the group `<folder>-point<p>`, one W&B
    run per seed, its config `base_config` (the sweep's config.json) with the point's values over it.

    Returns:
      The W&B run ids, point-major.
    """
    ranking = {row["point"]: row for row in result.ranking()}
    final = result.final_returns
    ids = []
    for p, point in enumerate(result.points):
        stats = {k: v for k, v in ranking[p].items() if k not in ("final_return", "diverged")}
        config = {"algo": result.algo, "env": result.env_id, **result.sources, **(base_config or {}), **point,
                  "sweep": folder, "point": p}  # fmt: skip
        ids += log_seeds(
            project, f"{folder}-point{p}", config, result.seeds, {k: v[p] for k, v in result.metrics.items()},
            [None if math.isnan(x) else float(x) for x in final[p]], stats, "sweep", result.num_updates[p],
        )  # fmt: skip
    return ids


def log_tune(result: Any, project: str, folder: str) -> list[str]:
    """Logs a `kl_rl.tune.TuneResult`: each of this worker's trials that trained is the group
    `<folder>-trial<n>`, one W&B run per seed, its config the base config with the trial's params
    over it. A pruned trial's history ends where it was pruned; a trial whose sampled config
    failed validation trained nothing and has no runs.

    Returns:
      The W&B run ids, trial-major.
    """
    from kl_rl import config as config_lib

    base = config_lib.to_dict(result.base_config)
    ids = []
    for trial in result.trials:
        metrics = result.metrics.get(trial["number"])
        if metrics is None:
            continue
        finals = trial["final_return"] or [None] * len(result.seeds)
        config = {"algo": result.algo, "env": result.env_id, "study": result.study_name, **result.sources, **base,
                  **trial["params"], "trial": trial["number"]}  # fmt: skip
        stats = {k: trial[k] for k in ("number", "state", "value", "pruned_at_env_steps") if k in trial}
        ids += log_seeds(project, f"{folder}-trial{trial['number']}", config, result.seeds, metrics, finals, stats,
                         "tune")  # fmt: skip
    return ids


def log_video(
    project: str, group: str, path: str | os.PathLike, name: str | None = None, config: dict[str, Any] | None = None,
    key: str = "video",
) -> str:  # fmt: skip
    """Logs a video file (e.g. from `kl-rl play`) as one W&B run in `group`, played at the file's
    own frame rate.

    Args:
      project: the W&B project.
      group: the W&B group: the run folder's name puts the video beside the seeds' runs.
      path: the video file: .mp4, .gif, .webm or .ogg, the formats W&B plays.
      name: the W&B run's name (default `<group>-video`).
      config: what the run records as its config (the seed, the episodes played, ...).
      key: the history key the video is logged under.

    Returns:
      The W&B run id.

    Raises:
      ConfigError: no such file, or a format W&B does not play.
    """
    wandb = require_wandb()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"no video file {path!r} to log to W&B")
    if os.path.splitext(path)[1].lower() not in VIDEO_SUFFIXES:
        raise ConfigError(f"W&B plays {', '.join(VIDEO_SUFFIXES)} videos, not {path!r}")
    run = wandb.init(
        project=project, group=group, name=name or f"{group}-video", job_type="play", config=_jsonable(config or {}),
        reinit="create_new", settings=wandb.Settings(console="off"),
    )  # fmt: skip
    try:
        run.log({key: wandb.Video(path)})
        return run.id
    finally:
        run.finish()


def _jsonable(value: Any) -> Any:
    """Tuples as lists, numpy scalars as Python ones: what W&B's config and summary take."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
