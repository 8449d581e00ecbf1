"""Running experiments from Python or the CLI: resolve a config, train seeds, save a run folder.

    >>> import kl_rl
    >>> result = kl_rl.run("ppo", "CartPole-v1", seeds=4, total_steps=50_000)
    >>> result.final_returns          # [seeds], mean over the evaluation episodes
    >>> result.save("runs/ppo-cartpole")
"""

import csv
import dataclasses
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

import kl_rl
from kl_rl import config as config_lib
from kl_rl import envs
from kl_rl.agents import algo_spec
from kl_rl.presets import preset
from kl_rl.train import make_trainer


def resolve_config(
    algo: str,
    env_id: str,
    config_file: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """Builds and validates a config: dataclass defaults < preset < file < overrides.

    Raises:
      ConfigError: unknown algo, env or field; a bad value; an unreadable file.
    """
    spec = algo_spec(algo)
    env = envs.make(env_id)
    values = preset(algo, env_id)
    if config_file is not None:
        values.update(config_lib.load_file(config_file))
    values.update(overrides or {})
    config = config_lib.build(spec.config, values)
    config.validate(env.action_space)
    return config


@dataclasses.dataclass
class RunResult:
    """A finished multi-seed run, in host memory."""

    algo: str
    env_id: str
    config: Any
    seeds: list[int]
    metrics: dict[str, np.ndarray]
    """Per-update metrics, each [num_seeds, num_updates]."""
    eval_returns: np.ndarray
    """[num_seeds, eval_episodes] undiscounted returns of the final policy."""
    wall_time_s: float
    compile_time_s: float
    final_state: Any = None

    @property
    def final_returns(self) -> np.ndarray:
        """Per seed: the mean return over the evaluation episodes of the final policy."""
        return self.eval_returns.mean(axis=1)

    @property
    def total_env_steps(self) -> int:
        """Env steps per seed."""
        return int(self.metrics["env_steps"][0, -1])

    @property
    def env_steps_per_s(self) -> float:
        """Training env steps per second of run time, summed over seeds (compile excluded)."""
        return len(self.seeds) * self.total_env_steps / self.wall_time_s

    def rows(self) -> list[dict[str, Any]]:
        """metrics.csv's rows: one per seed and update; eval_return is set at the final update."""
        first = ["env_steps", "episode_return", "episode_length", "kl", "entropy", "pg_loss", "vf_loss"]
        names = [k for k in first if k in self.metrics] + sorted(k for k in self.metrics if k not in first)
        out = []
        for s, seed in enumerate(self.seeds):
            num_updates = self.metrics[names[0]].shape[1]
            for u in range(num_updates):
                row = {"seed": seed, "update": u + 1}
                row.update({k: _scalar(self.metrics[k][s, u]) for k in names})
                row["eval_return"] = _scalar(self.final_returns[s]) if u == num_updates - 1 else None
                out.append(row)
        return out

    def summary(self) -> dict[str, Any]:
        """summary.json's content."""
        final = self.final_returns
        return {
            "algo": self.algo,
            "env": self.env_id,
            "seeds": self.seeds,
            "total_env_steps": self.total_env_steps,
            "final_return": [float(x) for x in final],
            "final_return_median": float(np.median(final)),
            "final_return_mean": float(np.mean(final)),
            "final_return_iqm": float(iqm(final)),
            "eval_episodes": int(self.eval_returns.shape[1]),
            "wall_time_s": self.wall_time_s,
            "compile_time_s": self.compile_time_s,
            "env_steps_per_s": self.env_steps_per_s,
            "kl_rl_version": kl_rl.__version__,
            "jax_version": jax.__version__,
            "device": str(jax.devices()[0].device_kind),
            "platform": platform.platform(),
        }

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Writes config.json, metrics.csv and summary.json, replacing `out_dir` only when done."""
        return write_run_folder(out_dir, self.config_dict(), self.rows(), self.summary())

    def config_dict(self) -> dict[str, Any]:
        return {"algo": self.algo, "env": self.env_id, "seeds": self.seeds, **config_lib.to_dict(self.config)}


def iqm(x: np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50% of values (Agarwal et al. 2021)."""
    x = np.sort(np.asarray(x, dtype=np.float64).ravel())
    n = len(x)
    lo, hi = n * 0.25, n * 0.75
    # Fractional weights at the cut points, so the IQM is defined for any n.
    weights = np.clip(np.minimum(np.arange(1, n + 1), hi) - np.maximum(np.arange(n), lo), 0.0, 1.0)
    return float(np.sum(weights * x) / np.sum(weights))


def _scalar(x: Any) -> Any:
    value = x.item() if hasattr(x, "item") else x
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_run_folder(out_dir: str | os.PathLike, config: dict, rows: list[dict], summary: dict) -> Path:
    """Writes a run folder atomically: into a temporary sibling, then renamed over `out_dir`."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        with open(tmp / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


CACHE_ENV = "KL_RL_CACHE_DIR"


def enable_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache, so rerunning a config skips XLA compilation.

    The folder is $KL_RL_CACHE_DIR, else ~/.cache/kl_rl/xla; KL_RL_CACHE_DIR=off disables it.
    A cache folder the user already gave JAX (jax_compilation_cache_dir) is left as it is.

    Returns:
      The cache folder in use, or None when disabled.
    """
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    path = os.environ.get(CACHE_ENV, str(Path.home() / ".cache" / "kl_rl" / "xla"))
    if path.strip().lower() in ("", "0", "off", "false", "none"):
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def run(
    algo: str = "ppo",
    env: str = "CartPole-v1",
    seeds: int = 1,
    config: Any = None,
    config_file: str | os.PathLike | None = None,
    progress: Callable[[int], None] | bool = False,
    **overrides: Any,
) -> RunResult:
    """Trains `seeds` seeds (0 .. seeds-1) in one compiled, vmapped program.

    Args:
      algo: algorithm name (see `kl_rl.agents.ALGOS`).
      env: env id (see `kl_rl.envs.ENV_IDS`).
      seeds: number of seeds.
      config: a ready config; if None it is resolved from the preset, `config_file` and
        `overrides` (field names as keywords, e.g. lr=3e-4, total_steps=100_000).
      progress: True for a tqdm bar; or a callable receiving env steps done (summed over seeds).
    """
    from kl_rl.errors import ConfigError

    if not isinstance(seeds, int) or seeds <= 0:
        raise ConfigError(f"--seeds must be a positive integer, got {seeds!r}")
    if config is None:
        config = resolve_config(algo, env, config_file, overrides)
    env_obj = envs.make(env)
    steps_per_update = 0  # set from the trainer below, before any callback can run
    bar = None  # opened after compilation, so its clock and rate cover the run only

    def callback(updates_done):
        if bar is not None:
            bar.update(int(updates_done) * steps_per_update - bar.n)
        elif callable(progress):
            progress(int(updates_done) * steps_per_update)

    trainer = make_trainer(
        algo,
        config,
        env_obj,
        progress=callback if progress else None,
        progress_every=max(1, config.num_updates // 200),
    )
    steps_per_update = trainer.steps_per_update * seeds
    keys = jax.vmap(jax.random.key)(np.arange(seeds))
    enable_compilation_cache()
    start = time.perf_counter()
    compiled = jax.jit(jax.vmap(trainer.train, in_axes=(0, None))).lower(keys, config).compile()
    compile_time = time.perf_counter() - start
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.num_updates * steps_per_update, unit="step", unit_scale=True, desc=f"{algo} {env}")
    start = time.perf_counter()
    try:
        out = jax.block_until_ready(compiled(keys, config))
        jax.effects_barrier()
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - start
    return RunResult(
        algo=algo,
        env_id=env,
        config=config,
        seeds=list(range(seeds)),
        metrics={k: np.asarray(v) for k, v in out.metrics.items()},
        eval_returns=np.asarray(out.eval_returns),
        wall_time_s=wall,
        compile_time_s=compile_time,
        final_state=out.state,
    )
