"""Run folders: what `kl-rl train` writes and reads back, and the result of a run in memory.

A run folder holds config.json (`run_config`), metrics.csv (one row per seed and update),
summary.json (final returns, divergence, timing, provenance), checkpoints/ (the train state) and
optionally tensorboard/. Every folder is written atomically (`write_run_folder`): into a
temporary sibling, renamed over the target only once complete. `read_run_config` and `load` read
one back, for `--resume`, for evaluation from Python and as the source of a reference policy or
a starting point (`kl_rl.sources`).

    >>> result = kl_rl.run("ppo", "CartPole-v1", seeds=4, total_steps=50_000)
    >>> result.save("runs/ppo-cartpole")
    >>> run = kl_rl.runfolder.load("runs/ppo-cartpole")
    >>> run.evaluate()            # [seeds, eval_episodes], summary.json's final returns
"""

import csv
import dataclasses
import json
import math
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

import kl_rl
from kl_rl import config as config_lib
from kl_rl import envs, parallel
from kl_rl.agents import SEQUENCE_ALGOS, algo_spec
from kl_rl.stats import iqm
from kl_rl.divergence import first_nonfinite
from kl_rl.errors import ConfigError
from kl_rl.reference import RefSpec
from kl_rl.train import make_trainer


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
    batching: str | None = None
    """How each device ran its seeds: "map" (one after another) or "vmap" (as one batch)."""
    compiled_from_cache: bool = False
    """Every program was loaded from kl_rl's program cache: nothing was traced or compiled."""
    sources: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The identity of the run's reference policy and of the run it started from, as
    `kl_rl.sources.RunSources.records` gives them ({} for a run with neither)."""

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
                row.update({k: plain(self.metrics[k][s, u]) for k in names})
                last = u == num_updates - 1 and diverged is None
                if last:
                    row["eval_return"] = plain(self.final_returns[s])
                elif points is not None and np.isfinite(points[s, u]):
                    row["eval_return"] = plain(points[s, u])  # an evaluation point
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
            "batching": self.batching,
            "compiled_from_cache": self.compiled_from_cache,
            **({"vectorization": self.vectorization} if self.env_path == "host" else {}),
            **({"env_time_s": self.env_time_s} if self.env_time_s is not None else {}),
            **self.sources,
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
            record = run_record(self.algo, self.env_id, len(self.seeds), self.config, self.env_path, self.sources)
            ckpt.save(num_updates, self.final_state, self.metrics, record)
            ckpt.wait()
            ckpt.close()

        config = run_config(
            self.algo, self.env_id, self.seeds, self.config, checkpoint_every, self.env_path, self.vectorization,
            self.sources, self.batching,
        )  # fmt: skip
        return write_run_folder(out_dir, config, self.rows(), self.summary(), save_state)

    def config_dict(self) -> dict[str, Any]:
        return {
            "algo": self.algo,
            "env": self.env_id,
            "seeds": self.seeds,
            "env_path": self.env_path,
            **self.sources,
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


def run_record(
    algo: str, env: str, seeds: int, config: Any, env_path: str = "jax", sources: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What a checkpoint records of its run, checked on resume: algo, env, path, seeds, config,
    and the identity of its reference policy and starting run (`RunSources.records`), if any."""
    record = {"algo": algo, "env": env, "env_path": env_path, "seeds": seeds, "config": config_lib.to_dict(config)}
    return {**record, **(sources or {})}


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


def require_tensorboard() -> Any:
    """tensorboardX's SummaryWriter, or a ConfigError naming the extra to install."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ConfigError(
            "{tensorboard} needs tensorboardX; install it with pip install 'kl_rl[tensorboard]'", "tensorboard"
        ) from None
    return SummaryWriter


def plain(x: Any) -> Any:
    """A metric value as JSON and CSV write it: a Python scalar, nan as None."""
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


RUN_KEYS = ("algo", "env", "seeds", "checkpoint_every", "env_path", "vectorization", "batching", "reference",
            "init_from")  # fmt: skip


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
    sources: dict[str, Any]
    """The records of the run's reference and starting run (`RunSources.records`)."""
    batching: str | None = None
    """How each device ran its seeds ("map" or "vmap"); None in folders from before the choice
    (they ran the platform's default)."""


def run_config(
    algo: str,
    env: str,
    seeds: list[int],
    config: Any,
    checkpoint_every: int,
    env_path: str = "jax",
    vectorization: str = "sync",
    sources: dict[str, Any] | None = None,
    batching: str | None = None,
) -> dict[str, Any]:
    """A run folder's config.json: the RUN_KEYS, then the config's fields (`read_run_config` reads it).

    `env_path` is the path that ran ("jax" or "host"), not "auto"; `batching` how each device
    ran its seeds ("map" or "vmap"). `sources` holds the records of a reference policy and a
    starting run (written only when there are any).
    """
    values = (algo, env, seeds, checkpoint_every, env_path, vectorization, batching)
    return {**dict(zip(RUN_KEYS, values, strict=False)), **(sources or {}), **config_lib.to_dict(config)}


def read_run_config(run_dir: str | os.PathLike) -> RunSpec:
    """A run folder's `RunSpec`, read from its config.json.

    Raises:
      ConfigError: the folder is not a run folder, or its config.json does not build a config.
    """
    from kl_rl.checkpoint import read_json

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
    cls = algo_spec(algo).config
    if algo in SEQUENCE_ALGOS:
        # Token-task folders written before issue 23 record the control fields their configs
        # inherited then (hidden_sizes, num_steps, ...); the configs no longer have them.
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in fields.items() if k in known}
    config = config_lib.build(cls, fields)
    env_path, vectorization = saved.get("env_path", "jax"), saved.get("vectorization", "sync")
    config.validate(envs.make(env, env_path, vectorization).action_space)
    sources = {k: saved[k] for k in ("reference", "init_from") if k in saved}
    every = int(saved.get("checkpoint_every", 0))
    return RunSpec(algo, env, seeds, config, every, env_path, vectorization, sources, saved.get("batching"))


@dataclasses.dataclass
class LoadedRun:
    """A run folder's final (or latest checkpointed) policies, for evaluation from Python.

    >>> run = kl_rl.runfolder.load("runs/ppo-cartpole")
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

        agent = self._agent()
        if agent.initial_state is not None:
            raise ConfigError(
                f"this run's policy is recurrent ({{network}} {self.config.network}): its action depends on the "
                "observations before this one, so dist/act of single observations are undefined; use evaluate",
                "network",
            )
        state = self.seed_state(seed)
        obs = rollout.observe(state.collector.obs_norm, jax.numpy.asarray(obs), self.config.normalize_obs)
        return agent.policy(state.agent, obs)

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

    spec = read_run_config(run_dir)
    algo, env, seeds, config = spec.algo, spec.env, spec.seeds, spec.config
    ref = spec.sources.get("reference")
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


def ref_spec_from_record(record: dict[str, Any]) -> RefSpec:
    """The reference network a run folder's "reference" record describes."""
    return RefSpec(record["algo"], config_lib.build(algo_spec(record["algo"]).config, record["config"]))
