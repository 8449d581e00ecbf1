"""Running experiments from Python or the CLI: resolve a config, train seeds, save a run folder.

    >>> import kl_rl
    >>> result = kl_rl.run("ppo", "CartPole-v1", seeds=4, total_steps=50_000)
    >>> result.final_returns          # [seeds], mean over the evaluation episodes
    >>> result.save("runs/ppo-cartpole")
"""

import csv
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

import kl_rl
from kl_rl import config as config_lib
from kl_rl import envs, parallel
from kl_rl.agents import algo_spec
from kl_rl.errors import ConfigError
from kl_rl.presets import preset
from kl_rl.train import NAN_BY_DESIGN, RefSpec, Reference, Setup, StartFrom, make_trainer


def resolve_config(
    algo: str,
    env_id: str,
    config_file: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    env_path: str = "auto",
) -> Any:
    """Builds and validates a config: dataclass defaults < preset < file < overrides.

    Raises:
      ConfigError: unknown algo, env or field; a bad value; an unreadable file.
    """
    spec = algo_spec(algo)
    env = envs.make(env_id, env_path)
    values = preset(algo, env_id)
    if config_file is not None:
        values.update(config_lib.load_file(config_file))
    values.update(overrides or {})
    config = config_lib.build(spec.config, values)
    check_task_algo(algo, env_id, env)
    config.validate(env.action_space)
    check_env_params(env, env_id, config)
    if envs.is_token_space(env.observation_space) and config.eval_episodes > env.held_out_size:
        raise ConfigError(
            f"--eval-episodes {config.eval_episodes} exceeds {env_id}'s {env.held_out_size} held-out problems; "
            f"use at most {env.held_out_size}"
        )
    return config


def check_env_params(env: Any, env_id: str, config: Any) -> None:
    """ConfigError for env params a host env cannot take or `env` does not have."""
    overrides = getattr(config, "env_params", None)
    if not overrides:
        return
    if envs.path_of(env) == "host":
        raise ConfigError(f"--env.NAME params are set inside JAX; {env_id} runs on the host path (use a JAX env)")
    envs.check_env_params(env, env_id, overrides)


def check_task_algo(algo: str, env_id: str, env: Any) -> None:
    """ConfigError unless a token-task algo meets a token task, and a control algo a control env."""
    from kl_rl.agents import SEQUENCE_ALGOS

    task = envs.is_token_space(env.observation_space)
    if task and algo not in SEQUENCE_ALGOS:
        raise ConfigError(f"{env_id} is a token task; train it with --algo {' | '.join(SEQUENCE_ALGOS)}")
    if algo in SEQUENCE_ALGOS and not task:
        raise ConfigError(f"--algo {algo} trains on token tasks ({', '.join(envs.TASK_IDS)}), not {env_id}")


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
    env_path: str = "jax"
    """Where the envs ran: "jax" (inside the XLA program) or "host" (gymnasium, via callbacks)."""
    vectorization: str = "sync"
    """How the host path stepped its copies: "sync" or "async" (processes)."""
    env_time_s: float | None = None
    """Host path: wall time inside the gymnasium envs (training and evaluation), a part of
    wall_time_s; the rest is the policy, the updates and the callbacks' overhead."""
    devices: int = 1
    """How many devices the seeds were spread over."""
    compiled_from_cache: bool = False
    """Every program was loaded from kl_rl's program cache: nothing was traced or compiled."""
    anchors: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The identity of the run's reference policy and of the run it started from, as
    `RunAnchors.records` gives them ({} for a run with neither)."""

    @property
    def final_returns(self) -> np.ndarray:
        """Per seed: the mean return over the evaluation episodes of the final policy."""
        return self.eval_returns.mean(axis=1)

    @property
    def diverged(self) -> list[int | None]:
        """Per seed, the first update (1-based) that left inf or nan in the agent or its metrics, or None."""
        return first_nonfinite(self.metrics)

    @property
    def total_env_steps(self) -> int:
        """Env steps per seed."""
        return int(self.metrics["env_steps"][0, -1])

    @property
    def env_steps_per_s(self) -> float:
        """Training env steps per second of run time, summed over seeds (compile excluded)."""
        return len(self.seeds) * self.total_env_steps / self.wall_time_s

    def rows(self) -> list[dict[str, Any]]:
        """metrics.csv's rows: one per seed and update; eval_return is set at the final update.

        A seed that diverged has rows up to and including its first non-finite update (`diverged`)
        and no eval_return: what came after is nan, and its final policy is meaningless.
        """
        first = ["env_steps", "episode_return", "episode_length", "kl", "entropy", "pg_loss", "vf_loss"]
        names = [k for k in first if k in self.metrics] + sorted(
            k for k in self.metrics if k not in first and k != "eval_return"
        )
        points = self.metrics.get("eval_return")
        num_updates = self.metrics[names[0]].shape[1]
        out = []
        for s, (seed, diverged) in enumerate(zip(self.seeds, self.diverged, strict=True)):
            for u in range(diverged or num_updates):
                row = {"seed": seed, "update": u + 1}
                row.update({k: _scalar(self.metrics[k][s, u]) for k in names})
                last = u == num_updates - 1 and diverged is None
                if last:
                    row["eval_return"] = _scalar(self.final_returns[s])
                elif points is not None and np.isfinite(points[s, u]):
                    row["eval_return"] = _scalar(points[s, u])  # an evaluation point
                else:
                    row["eval_return"] = None
                out.append(row)
        return out

    def summary(self) -> dict[str, Any]:
        """summary.json's content.

        `diverged` gives, per seed, the first update that went non-finite (or null). A diverged
        seed's final_return is null and it is left out of the median, mean and IQM, which are
        over the seeds that stayed finite (null if none did), so read them with `diverged_seeds`.
        """
        diverged = self.diverged
        final = [float(x) if d is None else None for x, d in zip(self.final_returns, diverged, strict=True)]
        finite = [x for x in final if x is not None]
        return {
            "algo": self.algo,
            "env": self.env_id,
            "seeds": self.seeds,
            "total_env_steps": self.total_env_steps,
            "final_return": final,
            "final_return_median": float(np.median(finite)) if finite else None,
            "final_return_mean": float(np.mean(finite)) if finite else None,
            "final_return_iqm": float(iqm(finite)) if finite else None,
            "diverged": diverged,
            "diverged_seeds": sum(d is not None for d in diverged),
            "eval_episodes": int(self.eval_returns.shape[1]),
            "wall_time_s": self.wall_time_s,
            "compile_time_s": self.compile_time_s,
            "env_steps_per_s": self.env_steps_per_s,
            "env_path": self.env_path,
            "devices": self.devices,
            "compiled_from_cache": self.compiled_from_cache,
            **({"vectorization": self.vectorization} if self.env_path == "host" else {}),
            **({"env_time_s": self.env_time_s} if self.env_time_s is not None else {}),
            **self.anchors,
            **provenance(),
        }

    def save(self, out_dir: str | os.PathLike, checkpoint_every: int = 0, tensorboard: bool = False) -> Path:
        """Writes config.json, metrics.csv, summary.json and the final state (checkpoints/), atomically.

        The folder replaces `out_dir` only once everything is written. A run trained with
        `checkpoint_dir=out_dir` already has its checkpoints there; those stay. With
        `tensorboard`, also TensorBoard event files (tensorboard/seed_<s>/), see `write_tensorboard`.
        """
        from kl_rl.checkpoint import FOLDER, Checkpointer

        if tensorboard:
            require_tensorboard()

        def save_state(folder: Path) -> None:
            if tensorboard:
                self.write_tensorboard(folder / "tensorboard")
            if self.final_state is None:
                return
            if (Path(out_dir) / FOLDER).is_dir():
                shutil.copytree(Path(out_dir) / FOLDER, folder / FOLDER)
                return
            ckpt = Checkpointer(folder)
            num_updates = int(self.metrics["env_steps"].shape[1])
            record = run_record(self.algo, self.env_id, len(self.seeds), self.config, self.env_path, self.anchors)
            ckpt.save(num_updates, self.final_state, self.metrics, record)
            ckpt.wait()
            ckpt.close()

        config = run_config(
            self.algo, self.env_id, self.seeds, self.config, checkpoint_every, self.env_path, self.vectorization,
            self.anchors,
        )  # fmt: skip
        return write_run_folder(out_dir, config, self.rows(), self.summary(), save_state)

    def config_dict(self) -> dict[str, Any]:
        return {
            "algo": self.algo,
            "env": self.env_id,
            "seeds": self.seeds,
            "env_path": self.env_path,
            **self.anchors,
            **config_lib.to_dict(self.config),
        }

    def write_tensorboard(self, folder: str | os.PathLike) -> Path:
        """TensorBoard event files, one run per seed (`folder/seed_<s>`): every metric per update
        against env steps (tag `train/<metric>`), and the final evaluation return (`eval/return`)."""
        writer_cls = require_tensorboard()
        folder = Path(folder)
        env_steps = self.metrics["env_steps"]
        for s, seed in enumerate(self.seeds):
            writer = writer_cls(str(folder / f"seed_{seed}"))
            try:
                for name in sorted(self.metrics):
                    if name == "env_steps":
                        continue
                    for u, value in enumerate(self.metrics[name][s]):
                        if np.isfinite(value):
                            writer.add_scalar(f"train/{name}", float(value), int(env_steps[s, u]))
                writer.add_scalar("eval/return", float(self.final_returns[s]), int(env_steps[s, -1]))
            finally:
                writer.close()
        return folder


def first_nonfinite(metrics: dict[str, Any]) -> list[int | None]:
    """Per seed, the first update (1-based, metrics.csv's `update`) that went non-finite, or None.

    An update counts if its `nonfinite` metric (`kl_rl.train.nonfinite`) is set, or if any other
    float metric, NAN_BY_DESIGN aside, is inf or nan there, so metrics without `nonfinite` work too.

    Args:
      metrics: [seeds, updates] arrays by name, such as `RunResult.metrics`.
    """
    arrays = {k: np.asarray(v) for k, v in metrics.items()}
    bad = np.zeros(next(iter(arrays.values())).shape, bool)
    for name, values in arrays.items():
        if name in NAN_BY_DESIGN or not np.issubdtype(values.dtype, np.inexact):
            continue
        bad |= values != 0 if name == "nonfinite" else ~np.isfinite(values)
    return [int(np.argmax(row)) + 1 if row.any() else None for row in bad]


def require_tensorboard() -> Any:
    """tensorboardX's SummaryWriter, or a ConfigError naming the extra to install."""
    from kl_rl.errors import ConfigError

    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ConfigError(
            "--tensorboard needs tensorboardX; install it with pip install 'kl_rl[tensorboard]'"
        ) from None
    return SummaryWriter


def run_record(
    algo: str, env: str, seeds: int, config: Any, env_path: str = "jax", anchors: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What a checkpoint records of its run, checked on resume: algo, env, path, seeds, config,
    and the identity of its reference policy and starting run (`RunAnchors.records`), if any."""
    record = {"algo": algo, "env": env, "env_path": env_path, "seeds": seeds, "config": config_lib.to_dict(config)}
    return {**record, **(anchors or {})}


def provenance() -> dict[str, Any]:
    """Versions, device and git commits, for a run or sweep folder's summary."""
    return {
        "kl_rl_version": kl_rl.__version__,
        "jax_version": jax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "platform": platform.platform(),
        "git_commit": _git_commit(Path.cwd()),
        "kl_rl_git_commit": _git_commit(Path(kl_rl.__file__).parent),
    }


def _git_commit(path: Path) -> str | None:
    """HEAD of the git work tree holding `path` ('+dirty' with uncommitted changes), else None."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


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


def write_run_folder(
    out_dir: str | os.PathLike,
    config: dict,
    rows: list[dict],
    summary: dict,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Writes a run folder atomically: into a temporary sibling, then renamed over `out_dir`.

    `extra(folder)`, if given, writes more into the temporary folder before the rename.
    """
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
        if extra is not None:
            extra(tmp)
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


def program_key(algo: str, env: str, env_path: str, config: Any, anchors: "RunAnchors | None" = None) -> tuple:
    """What names a trainer's programs in the program cache (`kl_rl.parallel.Programs`)."""
    key = (algo, env, env_path, json.dumps(config_lib.to_dict(config), sort_keys=True, default=str))
    return key if anchors is None or not anchors.records else (*key, anchors.cache_key)


def enable_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache, so rerunning a config skips XLA compilation.

    The folder is $KL_RL_CACHE_DIR, else ~/.cache/kl_rl/xla; KL_RL_CACHE_DIR=off disables it.
    A cache folder the user already gave JAX (jax_compilation_cache_dir) is left as it is.
    Programs of every size are kept (JAX's default skips those compiled in under a second),
    and kl_rl keeps its own serialized programs in a `kl_rl` subfolder (`parallel.Programs`).

    Returns:
      The cache folder in use, or None when disabled.
    """
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    path = os.environ.get(CACHE_ENV, str(Path.home() / ".cache" / "kl_rl" / "xla"))
    if path.strip().lower() in ("", "0", "off", "false", "none"):
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def run(
    algo: str = "ppo",
    env: str = "CartPole-v1",
    seeds: int = 1,
    config: Any = None,
    config_file: str | os.PathLike | None = None,
    progress: Callable[[int], None] | bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    env_path: str = "auto",
    vectorization: str = "sync",
    devices: int | None = None,
    reference: str | os.PathLike | dict | None = None,
    reference_seed: int | None = None,
    init_from: str | os.PathLike | dict | None = None,
    anchors: "RunAnchors | None" = None,
    **overrides: Any,
) -> RunResult:
    """Trains `seeds` seeds (0 .. seeds-1), spread over the local devices (`kl_rl.parallel`).

    The run is a few compiled programs (init, a segment of updates, evaluate), each compiled
    once; the segments run back to back and the progress bar moves between them. On CPU a
    seed's result depends only on its seed and config, not on the number of seeds or devices.

    Args:
      algo: algorithm name (see `kl_rl.agents.ALGOS`).
      env: env id: a JAX port (see `kl_rl.envs.ENV_IDS`) or any gymnasium id, which runs on the
        host-side path (gymnasium envs stepped through callbacks from the same program).
      seeds: number of seeds.
      config: a ready config; if None it is resolved from the preset, `config_file` and
        `overrides` (field names as keywords, e.g. lr=3e-4, total_steps=100_000).
      progress: True for a tqdm bar; or a callable receiving env steps done (summed over seeds).
      checkpoint_dir: a run folder to checkpoint into (`<checkpoint_dir>/checkpoints/<update>`).
        If it already holds a checkpoint of this run, training resumes from the newest one.
        The final state is always saved there.
      checkpoint_every: updates between checkpoints (0: only the final state).
      env_path: "auto" (the JAX port where there is one), "jax" or "host" (see `kl_rl.envs.make`).
      vectorization: how the host path steps its copies: "sync", or "async" (one process each).
      devices: how many local devices to use (default all; on CPU see
        `kl_rl.parallel.use_cpu_devices`).
      reference: a run folder of the same env whose final policy is the frozen reference the
        config's ref_kl_* penalty pulls toward (`resolve_anchors`); seed s uses its seed s mod n.
      reference_seed: the reference run's seed that every seed uses instead.
      init_from: a run folder whose parameters and normalizers the run starts from.
      anchors: instead of the three above, what `resolve_anchors` made of them.
    """
    from kl_rl.errors import ConfigError

    if not isinstance(seeds, int) or seeds <= 0:
        raise ConfigError(f"--seeds must be a positive integer, got {seeds!r}")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every must be a non-negative integer, got {checkpoint_every!r}")
    if config is None:
        config = resolve_config(algo, env, config_file, overrides, env_path)
    if anchors is None:
        anchors = resolve_anchors(algo, env, config, reference, reference_seed, init_from, env_path)
    trainer = make_trainer(algo, config, envs.make(env, env_path, vectorization), anchors.reference)
    lay = parallel.layout(seeds, devices, host_env=trainer.env_path == "host")
    steps_per_update = trainer.steps_per_update * seeds
    cache_dir = enable_compilation_cache()
    bar = None  # opened after compilation, so its clock and rate cover the run only

    def report(updates_done: int, first: bool) -> None:
        nonlocal bar
        if progress is True:
            if first:
                from tqdm.auto import tqdm

                total = config.num_updates * steps_per_update
                bar = tqdm(total=total, initial=updates_done * steps_per_update, unit="step", unit_scale=True,
                           desc=f"{algo} {env}")  # fmt: skip
            else:
                bar.update(updates_done * steps_per_update - bar.n)
        elif callable(progress) and not first:
            progress(updates_done * steps_per_update)

    record = run_record(algo, env, seeds, config, trainer.env_path, anchors.records)
    key = program_key(algo, env, trainer.env_path, config, anchors)
    programs = parallel.Programs(trainer, lay, cache_dir, key)
    keys = jax.vmap(jax.random.key)(np.arange(seeds))
    try:
        state, metrics, eval_returns, wall = train_items(
            programs, keys, [config] * seeds, report, checkpoint_dir, checkpoint_every, record,
            lambda: anchors.setup(list(range(seeds))),
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
        for vec in (trainer.vec_env, trainer.eval_env):
            if hasattr(vec, "close"):
                vec.close()
    host = trainer.env_path == "host"
    return RunResult(
        algo=algo,
        env_id=env,
        config=config,
        seeds=list(range(seeds)),
        metrics={k: np.asarray(v) for k, v in metrics.items()},
        eval_returns=np.asarray(eval_returns),
        wall_time_s=wall,
        compile_time_s=programs.compile_time_s,
        final_state=state,
        env_path=trainer.env_path,
        vectorization=vectorization,
        env_time_s=trainer.vec_env.env_seconds + trainer.eval_env.env_seconds if host else None,
        devices=len(lay.devices),
        compiled_from_cache=programs.loaded == len(programs.compiled),
        anchors=anchors.records,
    )


def train_items(programs, keys, configs, report=None, checkpoint_dir=None, every=0, record=None, setup=None):
    """`train` for a batch of items (seeds, or grid points x seeds) as segments of updates.

    Init (or restore), segments of updates, evaluate: each item's key is split as `train`
    splits it, so an item's result is `train(key, config)`'s. With `checkpoint_dir`, the state
    after every `every` updates (0: only the last) is saved under `record`, and a run resumes
    from the newest checkpoint there.

    Args:
      programs: a `parallel.Programs` whose layout holds len(keys) items.
      keys: [items] PRNG keys.
      configs: one config per item, all sharing the static fields.
      report: optional `report(updates_done, first)`, called once before the first segment
        runs and after each one completes.
      setup: optional `setup() -> kl_rl.train.Setup` for the items (their reference policy and
        starting parameters, `RunAnchors.setup`); called only when the run starts afresh.

    Once every item has gone non-finite (the `nonfinite` metric), no further segment starts:
    the metrics then stop short of the full run.

    Returns:
      (state, metrics, eval_returns, wall time of the run without compilation), the items
      axis leading.
    """
    from kl_rl.errors import ConfigError

    lay, trainer = programs.layout, programs.trainer
    num_updates = configs[0].num_updates
    init_keys, eval_keys = (parallel.pad(k, lay) for k in jax.vmap(jax.random.split, out_axes=1)(keys))
    stacked = parallel.pad(parallel.stack(configs), lay)
    report = report or (lambda updates_done, first: None)
    # Evaluation points (config.eval_every, token tasks) end segments, as checkpoints do.
    eval_every = getattr(configs[0], "eval_every", 0)
    step = math.gcd(every, eval_every) if every and eval_every else (every or eval_every)
    compile_before = programs.compile_time_s
    start = time.perf_counter()
    ckpt = None
    if checkpoint_dir is not None:
        from kl_rl.checkpoint import Checkpointer  # orbax: 0.3 s of imports a plain run need not pay

        ckpt = Checkpointer(checkpoint_dir)
    try:
        done, history = 0, []
        latest = ckpt.latest() if ckpt is not None else None
        if latest is None:
            items_setup = setup() if setup is not None else None
            items_setup = None if items_setup is None else parallel.pad(items_setup, lay)
            programs.prepare(init_keys, stacked, parallel.segments(num_updates, step), setup=items_setup)
            state = programs.init(init_keys, stacked, items_setup)
        else:
            saved = ckpt.record(latest)
            other_anchors = ({"reference", "init_from"} & set(saved)) - set(record)
            if {k: saved.get(k) for k in record} != record or other_anchors:
                raise ConfigError(
                    f"the checkpoints in {ckpt.directory} are of another run ({saved.get('algo')} on "
                    f"{saved.get('env')}, {saved.get('seeds')} seed(s)); resume with that run's settings"
                )
            # A resumed run needs init's shapes only, not a compiled init.
            one = jax.eval_shape(trainer.init, keys[0], configs[0])
            template = jax.tree.map(lambda x: jax.ShapeDtypeStruct((len(configs), *x.shape), x.dtype), one)
            state, saved_metrics = ckpt.restore(latest, template)
            state = parallel.pad(state, lay)
            programs.prepare(init_keys, stacked, parallel.segments(num_updates - latest, step), state)
            if trainer.env_path == "host":
                # The gymnasium envs' own state is not in the checkpoint: start new episodes.
                restart_keys = jax.vmap(lambda k: jax.random.fold_in(k, latest))(init_keys)
                state = programs.restart_envs(restart_keys, state)
            done, history = latest, [saved_metrics]
        # Without checkpoints every run is cut the same way, so progress or not, the same bits.
        plan = parallel.segments(num_updates - done, step)
        save_every = every or num_updates
        report(done, True)
        pending = None  # the last dispatched segment's metrics and the updates done after it
        diverged = np.zeros(lay.items, bool)

        def finish(segment_metrics, updates_done) -> bool:
            """Waits for a segment, reports it; True once every item has gone non-finite."""
            flags = np.asarray(segment_metrics["nonfinite"])[: lay.items]
            report(updates_done, False)
            diverged[:] |= flags.any(axis=1)
            return bool(diverged.all())

        for n in plan:
            state, metrics = programs.run(state, stacked, n)
            done += n
            if eval_every:
                # The held-out score of the policy at this point, in the segment's last row.
                scores = np.full((lay.items, n), np.nan, np.float32)
                if done % eval_every == 0 and done < num_updates:
                    point_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(eval_keys, done)
                    scores[:, -1] = np.asarray(programs.evaluate(point_keys, state, stacked))[: lay.items].mean(axis=1)
                metrics = {**metrics, "eval_return": scores}
            history.append(metrics)
            if ckpt is not None and (done % save_every == 0 or done == num_updates):
                ckpt.save(done, parallel.unpad(state, lay), _joined(history, lay), record)
            # The next segment is already dispatched when the previous one is waited for.
            stop = pending is not None and finish(*pending)
            pending = (metrics, done)
            if stop:
                break  # every item diverged: what follows would be NaN too
        if pending is not None:
            finish(*pending)
        eval_returns = jax.block_until_ready(programs.evaluate(eval_keys, state, stacked))
        wall = time.perf_counter() - start - (programs.compile_time_s - compile_before)
        metrics = _joined(history, lay)
        if ckpt is not None:
            ckpt.wait()
    finally:
        if ckpt is not None:
            ckpt.close()
    return parallel.unpad(state, lay), metrics, np.asarray(parallel.unpad(eval_returns, lay)), wall


def _joined(history: list[Any], lay: Any) -> dict[str, np.ndarray]:
    """Per-segment metrics (device or host arrays) as one host dict of [seeds, updates] arrays."""
    parts = [{k: np.asarray(v)[: lay.items] for k, v in h.items()} for h in history]
    return {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}


RUN_KEYS = ("algo", "env", "seeds", "checkpoint_every", "env_path", "vectorization", "reference", "init_from")


class RunSpec(NamedTuple):
    """What a run folder's config.json says of its run."""

    algo: str
    env: str
    seeds: list[int]
    config: Any
    checkpoint_every: int
    env_path: str
    """The path that ran: "jax" or "host" (folders from before the host path: "jax")."""
    vectorization: str
    anchors: dict[str, Any]
    """The records of the run's reference and starting run (`RunAnchors.records`)."""


def run_config(
    algo: str,
    env: str,
    seeds: list[int],
    config: Any,
    checkpoint_every: int,
    env_path: str = "jax",
    vectorization: str = "sync",
    anchors: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A run folder's config.json: the RUN_KEYS, then the config's fields (`read_run_config` reads it).

    `env_path` is the path that ran ("jax" or "host"), not "auto". `anchors` holds the records of
    a reference policy and a starting run (written only when there are any).
    """
    values = (algo, env, seeds, checkpoint_every, env_path, vectorization)
    return {**dict(zip(RUN_KEYS, values, strict=False)), **(anchors or {}), **config_lib.to_dict(config)}


def read_run_config(run_dir: str | os.PathLike) -> RunSpec:
    """A run folder's `RunSpec`, read from its config.json.

    Raises:
      ConfigError: the folder is not a run folder, or its config.json does not build a config.
    """
    from kl_rl.checkpoint import read_json
    from kl_rl.errors import ConfigError

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {str(run_dir)!r} does not exist; give a folder written by kl-rl train")
    saved = read_json(run_dir / "config.json", "not a kl-rl train run folder")
    missing = [k for k in ("algo", "env", "seeds") if k not in saved]
    if missing or "grid" in saved or "space" in saved:
        raise ConfigError(f"{run_dir} is not a kl-rl train run folder (its config.json has no {missing or 'run'})")
    algo, env = saved["algo"], saved["env"]
    seeds = saved["seeds"]
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    fields = {k: v for k, v in saved.items() if k not in RUN_KEYS}
    config = config_lib.build(algo_spec(algo).config, fields)
    env_path, vectorization = saved.get("env_path", "jax"), saved.get("vectorization", "sync")
    config.validate(envs.make(env, env_path, vectorization).action_space)
    anchors = {k: saved[k] for k in ("reference", "init_from") if k in saved}
    every = int(saved.get("checkpoint_every", 0))
    return RunSpec(algo, env, seeds, config, every, env_path, vectorization, anchors)


@dataclasses.dataclass
class LoadedRun:
    """A run folder's final (or latest checkpointed) policies, for evaluation from Python.

        >>> run = kl_rl.runner.load("runs/ppo-cartpole")
        >>> run.evaluate()                    # [seeds, eval_episodes] returns, as in summary.json
        >>> action = run.act(obs, seed=0)     # obs unnormalized: the saved normalizer is applied
    """

    algo: str
    env_id: str
    config: Any
    seeds: list[int]
    update: int
    """Updates done by the loaded state."""
    state: Any
    """The `TrainState`, batched over seeds."""
    trainer: Any

    def _agent(self):
        spec = algo_spec(self.algo)
        vec_env = self.trainer.vec_env
        return spec.make(self.config, vec_env.observation_space, vec_env.action_space)

    def seed_state(self, seed: int = 0) -> Any:
        """The train state of one seed."""
        return jax.tree.map(lambda x: x[self.seeds.index(seed)], self.state)

    def dist(self, obs: Any, seed: int = 0) -> Any:
        """The policy's action distribution for a batch of raw observations [B, *obs_shape]."""
        from kl_rl import rollout

        state = self.seed_state(seed)
        obs = rollout.observe(state.collector.obs_norm, jax.numpy.asarray(obs), self.config.normalize_obs)
        return self._agent().policy(state.agent, obs)

    def act(self, obs: Any, seed: int = 0, key: jax.Array | None = None) -> jax.Array:
        """Env-ready actions for raw observations [B, *obs_shape]: the mode, or a sample with `key`."""
        from kl_rl import rollout

        dist = self.dist(obs, seed)
        action = dist.mode() if key is None else dist.sample(key)
        return rollout.env_action(self.trainer.vec_env.action_space, action)

    def evaluate(self, keys: jax.Array | None = None) -> np.ndarray:
        """[seeds, eval_episodes] returns of the loaded policies.

        By default each seed uses the evaluation key its training run used, so a finished run
        reproduces its summary.json's final returns exactly.
        """
        if keys is None:
            seed_keys = jax.vmap(jax.random.key)(np.asarray(self.seeds))
            keys = jax.vmap(jax.random.split)(seed_keys)[:, 1]
        # Laid out as training laid it out, so each seed's evaluation is the same program.
        lay = parallel.layout(len(self.seeds), host_env=self.trainer.env_path == "host")
        programs = parallel.Programs(self.trainer, lay)
        configs = parallel.stack([self.config] * len(self.seeds))
        args = (parallel.pad(x, lay) for x in (keys, self.state, configs))
        return np.asarray(parallel.unpad(programs.evaluate(*args), lay))


def load(run_dir: str | os.PathLike, update: int | None = None) -> LoadedRun:
    """Loads a run folder's checkpoint (the newest unless `update` is given) for evaluation.

    Raises:
      ConfigError: not a run folder, no checkpoint, or a checkpoint that does not match.
    """
    from kl_rl.checkpoint import Checkpointer
    from kl_rl.errors import ConfigError

    spec = read_run_config(run_dir)
    algo, env, seeds, config = spec.algo, spec.env, spec.seeds, spec.config
    ref = spec.anchors.get("reference")
    ref_spec = None if ref is None else ref_spec_from_record(ref)
    trainer = make_trainer(algo, config, envs.make(env, spec.env_path, spec.vectorization), ref_spec)
    keys = jax.vmap(jax.random.key)(np.asarray(seeds))
    template = jax.eval_shape(jax.vmap(trainer.init, in_axes=(0, None)), keys, config)
    ckpt = Checkpointer(run_dir, read_only=True)
    try:
        update = ckpt.latest() if update is None else update
        if update is None:
            raise ConfigError(f"{run_dir} holds no checkpoint; it was written before runs saved their state")
        state, _ = ckpt.restore(update, template)
    finally:
        ckpt.close()
    return LoadedRun(algo, env, config, seeds, int(update), state, trainer)


@dataclasses.dataclass
class RunAnchors:
    """A run's frozen reference policy and the run it starts from (`--reference`, `--init-from`).

    Resolved once per command by `resolve_anchors`; `setup` gives each item (a seed, or a grid
    point's seed) its reference and starting parameters: the source run's seed `s mod n` for
    item seed s, or `reference_seed`.
    """

    reference: RefSpec | None = None
    """The reference policy's network, or None."""
    records: dict[str, Any] = dataclasses.field(default_factory=dict)
    """{"reference": ..., "init_from": ...}: the source run folder, its update, the seeds used and
    the sha256 of its parameters, as config.json, summary.json and the checkpoints keep them."""
    _reference_run: "LoadedRun | None" = None
    _start_run: "LoadedRun | None" = None
    _reference_seed: int | None = None

    @property
    def cache_key(self) -> tuple:
        """What the anchors change in the compiled programs: the reference's network, and
        whether init takes starting parameters."""
        ref = None if self.reference is None else (self.reference.algo, config_lib.to_dict(self.reference.config))
        return (json.dumps(ref, sort_keys=True, default=str), "init_from" in self.records)

    def setup(self, item_seeds: list[int]) -> Setup | None:
        """init's per-item Setup (leading items axis), or None when the run has no anchors.

        A resumed run does not call this: its reference is in its checkpoint.
        """
        if self.reference is None and "init_from" not in self.records:
            return None
        reference = start = None
        if self.reference is not None:
            loaded = self._reference_run or _reload(self.records["reference"], "--reference")
            picks = [self._reference_seed if self._reference_seed is not None else loaded.seeds[s % len(loaded.seeds)]
                     for s in item_seeds]  # fmt: skip
            rows = np.asarray([loaded.seeds.index(p) for p in picks])
            reference = Reference(
                agent=jax.tree.map(lambda x: x[rows], loaded.state.agent),
                obs_norm=jax.tree.map(lambda x: x[rows], loaded.state.collector.obs_norm),
            )
        if "init_from" in self.records:
            loaded = self._start_run or _reload(self.records["init_from"], "--init-from")
            rows = np.asarray([s % len(loaded.seeds) for s in item_seeds])
            collector = loaded.state.collector
            start = StartFrom(
                params=jax.tree.map(lambda x: x[rows], loaded.state.agent.params),
                obs_norm=jax.tree.map(lambda x: x[rows], collector.obs_norm),
                reward_norm=jax.tree.map(lambda x: x[rows], collector.reward_norm),
            )
        return Setup(reference=reference, start=start)


def ref_spec_from_record(record: dict[str, Any]) -> RefSpec:
    """The reference network a run folder's "reference" record describes."""
    return RefSpec(record["algo"], config_lib.build(algo_spec(record["algo"]).config, record["config"]))


def params_sha256(tree: Any) -> str:
    """sha256 of a pytree's arrays (dtype, shape and bytes, leaf by leaf): a run's identity."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        array = np.asarray(leaf)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _source_record(loaded: "LoadedRun", run_dir: Any, tree: Any) -> dict[str, Any]:
    return {
        "run": str(Path(run_dir).absolute()),
        "update": loaded.update,
        "algo": loaded.algo,
        "seeds": loaded.seeds,
        "params_sha256": params_sha256(tree),
    }


def _load_source(run_dir: Any, flag: str, env: str, env_path: str) -> "LoadedRun":
    """A finished run of `env` to anchor to, or a ConfigError naming the flag and the fix."""
    from kl_rl.errors import ConfigError

    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} does not exist; give the folder of a kl-rl train run")
    loaded = load(path)
    if loaded.env_id != env:
        raise ConfigError(f"{flag} {str(path)!r} is a run on {loaded.env_id}, not {env}; give a run of {env}")
    ours = envs.make(env, env_path)
    theirs = loaded.trainer.vec_env
    if theirs.observation_space != ours.observation_space or theirs.action_space != ours.action_space:
        raise ConfigError(
            f"{flag} {str(path)!r} acts on other spaces ({theirs.observation_space}, {theirs.action_space}) "
            f"than {env} here ({ours.observation_space}, {ours.action_space}); give a run of the same env"
        )
    return loaded


def _reload(record: dict[str, Any], flag: str) -> "LoadedRun":
    """The run a record names, checked to be the one the record was made from."""
    from kl_rl.errors import ConfigError

    loaded = load(record["run"], record["update"]) if Path(record["run"]).is_dir() else None
    tree = None if loaded is None else _anchor_tree(loaded, flag)
    if loaded is None or params_sha256(tree) != record["params_sha256"]:
        raise ConfigError(
            f"{flag} {record['run']!r} is gone or has changed since this run began (its parameters' sha256 "
            "differs); restore that run folder, or start a new run"
        )
    return loaded


def _anchor_tree(loaded: "LoadedRun", flag: str) -> Any:
    """What a reference (policy and normalizer) or a starting run (parameters and normalizers) takes."""
    collector = loaded.state.collector
    if flag == "--reference":
        return (loaded.state.agent, collector.obs_norm)
    return (loaded.state.agent.params, collector.obs_norm, collector.reward_norm)


def resolve_anchors(
    algo: str,
    env: str,
    config: Any,
    reference: str | os.PathLike | dict | None = None,
    reference_seed: int | None = None,
    init_from: str | os.PathLike | dict | None = None,
    env_path: str = "auto",
) -> RunAnchors:
    """Loads and checks a run's reference policy and starting parameters.

    Args:
      algo, env, config: the run's.
      reference: a run folder of the same env whose final policy is the frozen reference; or
        the record a run folder keeps of it (resuming), which is reloaded only if needed.
      reference_seed: the reference run's seed every item uses; default: item seed s uses the
        reference's seed s mod n.
      init_from: a run folder of the same env and policy network whose parameters and
        normalizers the run starts from (item seed s takes its seed s mod n); or its record.

    Raises:
      ConfigError: a missing folder, another env or spaces, a reference flag without
        --reference, an algo with no use for a reference, networks that do not match.
    """
    from kl_rl.errors import ConfigError

    anchors = RunAnchors(_reference_seed=reference_seed)
    spec = algo_spec(algo)
    fields = {f.name for f in dataclasses.fields(spec.config)}
    if reference is None:
        if algo == "dpo":
            raise ConfigError("online DPO needs --reference RUN_DIR: its implicit reward is beta log(pi / pi_ref)")
        if reference_seed is not None:
            raise ConfigError("--reference-seed needs --reference RUN_DIR")
        used = config.uses_reference_options() if hasattr(config, "uses_reference_options") else []
        if used:
            flags = ", ".join("--" + n.replace("_", "-") for n in used)
            raise ConfigError(f"{flags} set a penalty toward a reference policy; give it with --reference RUN_DIR")
    else:
        if "ref_kl_coef" not in fields or algo == "sft":
            raise ConfigError(
                f"--algo {algo} has no KL penalty toward a reference; use ppo, vpg, trpo, cem, grpo, rloo, ppo-lm "
                "or dpo"
            )
        if isinstance(reference, dict):
            record = reference
            anchors.reference = ref_spec_from_record(record)
            anchors._reference_seed = record.get("reference_seed")
        else:
            loaded = _load_source(reference, "--reference", env, env_path)
            if reference_seed is not None and reference_seed not in loaded.seeds:
                raise ConfigError(
                    f"--reference-seed {reference_seed} is not a seed of {str(reference)!r} (it has {loaded.seeds})"
                )
            record = _source_record(loaded, reference, _anchor_tree(loaded, "--reference"))
            record.update(reference_seed=reference_seed, config=config_lib.to_dict(loaded.config))
            anchors.reference = RefSpec(loaded.algo, loaded.config)
            anchors._reference_run = loaded
            if getattr(config, "init_from_reference", False):
                _check_policy_start(algo, config, loaded, reference)
        anchors.records["reference"] = record
    if init_from is not None:
        if isinstance(init_from, dict):
            anchors.records["init_from"] = init_from
        else:
            loaded = _load_source(init_from, "--init-from", env, env_path)
            _check_start(algo, config, loaded, init_from)
            anchors.records["init_from"] = _source_record(loaded, init_from, _anchor_tree(loaded, "--init-from"))
            anchors._start_run = loaded
    return anchors


def _check_policy_start(algo: str, config: Any, loaded: "LoadedRun", run_dir: Any) -> None:
    """ConfigError unless a token-task agent can start from the reference's policy (same shapes)."""
    vec = loaded.trainer.vec_env
    target = jax.eval_shape(algo_spec(algo).make(config, vec.observation_space, vec.action_space).init,
                            jax.random.key(0))  # fmt: skip
    source = getattr(loaded.state.agent, "params", {})
    mine = jax.tree.map(lambda x: x.shape, target.params["policy"])
    if "policy" not in source or jax.tree.map(lambda x: x.shape[1:], source["policy"]) != mine:
        c = loaded.config
        raise ConfigError(
            f"--reference {str(run_dir)!r} has another policy network (layers {getattr(c, 'layers', '-')}, width "
            f"{getattr(c, 'width', '-')}, heads {getattr(c, 'heads', '-')}); give the same --layers/--width/--heads "
            "or --init-from-reference false"
        )


def _check_start(algo: str, config: Any, loaded: "LoadedRun", run_dir: Any) -> None:
    """ConfigError unless the run `loaded` has parameters of the shapes this run's agent has."""
    from kl_rl.errors import ConfigError

    vec = loaded.trainer.vec_env
    target = jax.eval_shape(algo_spec(algo).make(config, vec.observation_space, vec.action_space).init,
                            jax.random.key(0))  # fmt: skip
    source = loaded.state.agent
    if not hasattr(target, "params") or not hasattr(source, "params"):
        raise ConfigError(
            f"--init-from copies an actor-critic's parameters; {algo} from a {loaded.algo} run cannot "
            "(use ppo, vpg or trpo for both)"
        )
    shapes = jax.tree.map(lambda x: x.shape, target.params)
    theirs = jax.tree.map(lambda x: x.shape[1:], source.params)
    if shapes != theirs:
        raise ConfigError(
            f"--init-from {str(run_dir)!r} has networks of other shapes (hidden sizes "
            f"{tuple(loaded.config.hidden_sizes)}, this run {tuple(config.hidden_sizes)}); give the same --hidden-sizes"
        )
    if (loaded.config.activation, loaded.config.distribution) != (config.activation, config.distribution):
        raise ConfigError(
            f"--init-from {str(run_dir)!r} has {loaded.config.activation} networks with a "
            f"{loaded.config.distribution} policy; give --activation {loaded.config.activation} "
            f"--distribution {loaded.config.distribution}"
        )
    if bool(loaded.config.normalize_obs) != bool(config.normalize_obs):
        raise ConfigError(
            f"--init-from {str(run_dir)!r} was trained with normalize_obs={loaded.config.normalize_obs}; "
            f"its parameters expect that input, so give --normalize-obs {loaded.config.normalize_obs}"
        )
