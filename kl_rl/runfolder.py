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
import re
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
    """A run folder's final (or an earlier checkpointed) policies, for evaluation from Python.

    >>> run = kl_rl.load("runs/ppo-cartpole")          # or kl_rl.load(DIR, update=U)
    >>> run.evaluate()                    # [seeds, eval_episodes] returns, as in summary.json
    >>> run.evaluate(episodes=100, env_params={"masspole": 0.5})
    >>> run.evaluation(stochastic=True).save()         # DIR/eval/<name>.json, as kl-rl eval writes
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
    env: Any = None
    """What `kl_rl.envs.make` made of the run's env; evaluation under other settings builds its
    trainer on it."""
    batching: str | None = None
    """How the run's devices ran their seeds ("map" or "vmap"), which evaluation repeats; None:
    the platform's default."""
    sources: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The records of the run's reference and starting run (`RunSources.records`)."""
    run_dir: Path | None = None

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
        # A token policy's KV cache is a way to sample; its policy is a function of the buffer.
        if agent.initial_state is not None and agent.score_responses is None:
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

    def eval_config(
        self, episodes: int | None = None, stochastic: bool | None = None, env_params: dict[str, Any] | None = None
    ) -> Any:
        """The run's config with its evaluation settings changed, checked against the env.

        Args:
          episodes: evaluation episodes per seed (`eval_episodes`, static: one env copy each).
          stochastic: sample actions (True) or act with the distribution's mode (False); None
            keeps the run's `eval_deterministic`.
          env_params: env params by name, on top of the run's own `env_params` (traced, so JAX
            ports and the env families only).

        Raises:
          ConfigError: episodes not a positive integer; an env param the env does not have, a
            non-finite value, or any env param on the host path.
        """
        changes: dict[str, Any] = {}
        if episodes is not None:
            if isinstance(episodes, bool) or not isinstance(episodes, int | np.integer) or episodes <= 0:
                raise ConfigError(f"{{episodes}} must be a positive integer, got {episodes!r}", "episodes")
            changes["eval_episodes"] = int(episodes)
        if stochastic is not None:
            changes["eval_deterministic"] = not stochastic
        if env_params:
            values = {str(k): config_lib.parse_value(f"env.{k}", v, float) for k, v in env_params.items()}
            changes["env_params"] = {**self.config.env_params, **values}
        if not changes:
            return self.config
        from kl_rl import resolve

        config = self.config.replace(**changes)
        if env_params and not config.rollout.env_params:
            raise ConfigError(f"{self.algo} runs take no env params; evaluate without them")
        resolve.check_config(self.algo, self.env_id, self.env, config)
        return config

    def _rows(self, seeds: Any) -> list[int]:
        """The rows of the loaded state that hold `seeds` (None: every seed)."""
        if seeds is None:
            return list(range(len(self.seeds)))
        given = [seeds] if isinstance(seeds, int | np.integer) else list(seeds)
        have = ", ".join(map(str, self.seeds))
        bad = [s for s in given if isinstance(s, bool) or not isinstance(s, int | np.integer) or s not in self.seeds]
        if not given or bad:
            what = f"seed {bad[0]!r} is not one of the run's" if bad else "no seed given; choose from the run's"
            raise ConfigError(f"{{seeds}}: {what} seeds {have}", "seeds")
        if len(set(given)) != len(given):
            raise ConfigError(f"{{seeds}} names a seed twice ({', '.join(map(str, given))}); name each once", "seeds")
        return [self.seeds.index(s) for s in given]

    def evaluate(
        self,
        keys: jax.Array | None = None,
        *,
        episodes: int | None = None,
        stochastic: bool | None = None,
        seeds: Any = None,
        env_params: dict[str, Any] | None = None,
    ) -> np.ndarray:
        """[seeds, episodes] returns of the loaded policies, all in one compiled program.

        The program is the trainer's own `evaluate` over the seeds, laid out on the devices as
        training laid out its seeds (`kl_rl.parallel`, with the run's batching). By default each
        seed uses the evaluation key its training run used, so at the run's own settings a
        finished run reproduces its summary.json's final returns exactly. With "map" batching
        (CPU's default) a seed's returns are the same whichever seeds run beside it; with "vmap"
        they may differ in the last bits with the batch (`kl_rl.parallel`).

        Args:
          keys: [len(seeds)] PRNG keys; default each seed's training evaluation key.
          episodes, stochastic, env_params: see `eval_config`; each None keeps the run's.
          seeds: the run's seeds to evaluate (a list, or one seed), default all.

        Raises:
          ConfigError: a seed the run does not have, or bad settings (`eval_config`).
        """
        rows = self._rows(seeds)
        config = self.eval_config(episodes, stochastic, env_params)
        if keys is None:
            seed_keys = jax.vmap(jax.random.key)(np.asarray([self.seeds[r] for r in rows]))
            keys = jax.vmap(jax.random.split)(seed_keys)[:, 1]
        elif len(keys) != len(rows):
            raise ConfigError(f"{{keys}} holds {len(keys)} keys for {len(rows)} seeds; give one per seed", "keys")
        state = self.state
        if len(rows) != len(self.seeds) or rows != sorted(rows):
            state = jax.tree.map(lambda x: x[np.asarray(rows)], state)
        trainer = self.trainer
        if config is not self.config:
            trainer = make_trainer(self.algo, config, self.env, self.trainer.reference)
        lay = parallel.layout(len(rows), host_env=trainer.env_path == "host", batching=self.batching)
        try:
            programs = parallel.Programs(trainer, lay, *self._program_cache(trainer, config))
            configs = parallel.stack([config] * len(rows))
            args = (parallel.pad(x, lay) for x in (keys, state, configs))
            return np.asarray(parallel.unpad(programs.evaluate(*args), lay))
        finally:
            if trainer is not self.trainer:
                for vec in (trainer.vec_env, trainer.eval_env):
                    if hasattr(vec, "close"):
                        vec.close()

    def _program_cache(self, trainer: Any, config: Any) -> tuple[str | None, Any]:
        """(cache folder, key) under which training kept its programs: at the run's own settings
        its evaluate program loads from there (`kl_rl.parallel.Programs`)."""
        from kl_rl import pipeline, sources

        run_sources = sources.RunSources(reference=trainer.reference, records=self.sources)
        key = pipeline.program_key(self.algo, self.env_id, trainer.env_path, config, run_sources)
        return pipeline.enable_compilation_cache(), key

    def evaluation(
        self,
        keys: jax.Array | None = None,
        *,
        episodes: int | None = None,
        stochastic: bool | None = None,
        seeds: Any = None,
        env_params: dict[str, Any] | None = None,
    ) -> "Evaluation":
        """`evaluate`'s returns with what produced them, ready to `save` as eval/<name>.json."""
        rows = self._rows(seeds)
        config = self.eval_config(episodes, stochastic, env_params)
        returns = self.evaluate(keys, episodes=episodes, stochastic=stochastic, seeds=seeds, env_params=env_params)
        return Evaluation(
            run_dir=self.run_dir, algo=self.algo, env_id=self.env_id, update=self.update,
            num_updates=int(self.config.num_updates), seeds=[self.seeds[r] for r in rows], returns=returns,
            stochastic=not config.eval_deterministic, env_params=dict(config.env_params),
            overrides={k: config.env_params[k] for k in sorted(env_params or {})},
            keys="given" if keys is not None else "training", subset=seeds is not None,
        )  # fmt: skip


EVAL_FOLDER = "eval"
"""The run folder's subfolder that `Evaluation.save` writes into; training never reads it."""


@dataclasses.dataclass
class Evaluation:
    """An evaluation of a run folder's policies (`LoadedRun.evaluation`, `kl-rl eval`)."""

    run_dir: Path | None
    algo: str
    env_id: str
    update: int
    """Updates done by the evaluated policies."""
    num_updates: int
    """Updates of the whole run."""
    seeds: list[int]
    returns: np.ndarray
    """[seeds, episodes] undiscounted returns."""
    stochastic: bool
    """Whether actions were sampled (else the distribution's mode)."""
    env_params: dict[str, Any]
    """Every env param the evaluation set (the run's own and the overrides)."""
    overrides: dict[str, Any]
    """The env params given for this evaluation only."""
    keys: str
    """"training" (each seed's training evaluation key) or "given"."""
    subset: bool = False
    """Whether only some of the run's seeds were chosen."""

    @property
    def episodes(self) -> int:
        return int(self.returns.shape[1])

    @property
    def final_returns(self) -> np.ndarray:
        """Per seed: the mean return over the episodes."""
        return self.returns.mean(axis=1)

    def default_name(self) -> str:
        """A file name that says what was evaluated, e.g. `update24-16ep-mode-masspole=0.5`."""
        parts = [f"update{self.update}", f"{self.episodes}ep", "stochastic" if self.stochastic else "mode"]
        parts += [f"{k}={v:g}" for k, v in self.overrides.items()]
        if self.subset:
            parts.append("seeds" + ",".join(map(str, self.seeds)))
        if self.keys != "training":
            parts.append("keys")
        return re.sub(r"[^A-Za-z0-9._=,+-]", "_", "-".join(parts))

    def summary(self) -> dict[str, Any]:
        """eval/<name>.json's content: the settings, per-seed returns and every episode's.

        A seed whose returns are not finite (a diverged policy) has a null return and is left out
        of the median, mean and IQM, as in summary.json.
        """
        final = [plain(x) if np.isfinite(x) else None for x in self.final_returns]
        finite = [x for x in final if x is not None]
        return {
            "algo": self.algo,
            "env": self.env_id,
            "run": None if self.run_dir is None else str(self.run_dir),
            "update": self.update,
            "num_updates": self.num_updates,
            "seeds": self.seeds,
            "episodes": self.episodes,
            "stochastic": self.stochastic,
            "env_params": self.env_params,
            "env_param_overrides": self.overrides,
            "keys": self.keys,
            "return": final,
            "return_median": float(np.median(finite)) if finite else None,
            "return_mean": float(np.mean(finite)) if finite else None,
            "return_iqm": float(iqm(finite)) if finite else None,
            "returns": [[plain(x) for x in row] for row in self.returns],
            **provenance(),
        }

    def save(self, name: str | None = None, run_dir: str | os.PathLike | None = None) -> Path:
        """Writes `summary()` to <run_dir>/eval/<name>.json atomically (a temporary file renamed
        into place); nothing else in the run folder is touched. An existing file of that name is
        replaced.

        Raises:
          ConfigError: no run folder, or a name that is not a plain file name.
        """
        folder = Path(run_dir) if run_dir is not None else self.run_dir
        if folder is None:
            raise ConfigError("this evaluation has no run folder to save into; pass {run_dir}", "run_dir")
        name = self.default_name() if name is None else check_eval_name(name)
        text = json.dumps(self.summary(), indent=2) + "\n"
        out = folder / EVAL_FOLDER
        out.mkdir(exist_ok=True)
        path = out / f"{name}.json"
        with tempfile.NamedTemporaryFile("w", dir=out, prefix=f".{name}.", suffix=".tmp", delete=False) as f:
            try:
                f.write(text)
            except BaseException:
                os.unlink(f.name)
                raise
        os.replace(f.name, path)
        return path


def check_eval_name(name: str) -> str:
    """`name` if it can name a file in eval/ (letters, digits and ._=,+-, not starting with a dot).

    Raises:
      ConfigError: any other name.
    """
    if not re.fullmatch(r"[A-Za-z0-9_=,+-][A-Za-z0-9._=,+-]*", name or "") or name.endswith(".json"):
        raise ConfigError(
            f"{{name}} {name!r} is not a plain file name; use letters, digits and ._=,+- "
            "(no folder, no leading dot, no .json)",
            "name",
        )
    return name


def load(run_dir: str | os.PathLike, update: int | None = None) -> LoadedRun:
    """Loads a run folder's checkpoint (the newest unless `update` is given) for evaluation.

    `kl_rl.load` is the same function.

    Raises:
      ConfigError: not a run folder, no checkpoint (at `update`), or a checkpoint that does not match.
    """
    from kl_rl.checkpoint import Checkpointer

    if update is not None and (isinstance(update, bool) or not isinstance(update, int | np.integer) or update < 0):
        raise ConfigError(f"{{update}} must be a non-negative integer, got {update!r}", "update")
    spec = read_run_config(run_dir)
    algo, env, seeds, config = spec.algo, spec.env, spec.seeds, spec.config
    ref = spec.sources.get("reference")
    ref_spec = None if ref is None else ref_spec_from_record(ref)
    env_obj = envs.make(env, spec.env_path, spec.vectorization)
    trainer = make_trainer(algo, config, env_obj, ref_spec)
    keys = jax.vmap(jax.random.key)(np.asarray(seeds))
    template = jax.eval_shape(jax.vmap(trainer.init, in_axes=(0, None)), keys, config)
    ckpt = Checkpointer(run_dir, read_only=True)
    try:
        if update is None:
            update = ckpt.latest()
        elif int(update) not in ckpt.updates():
            held = ", ".join(map(str, ckpt.updates())) or "none"
            raise ConfigError(f"{run_dir} has no checkpoint at {{update}} {update}; it holds updates {held}", "update")
        if update is None:
            raise ConfigError(f"{run_dir} holds no checkpoint; it was written before runs saved their state")
        state, _ = ckpt.restore(int(update), template)
    finally:
        ckpt.close()
    return LoadedRun(algo, env, config, seeds, int(update), state, trainer, env_obj, spec.batching, spec.sources,
                     Path(run_dir))  # fmt: skip


def ref_spec_from_record(record: dict[str, Any]) -> RefSpec:
    """The reference network a run folder's "reference" record describes."""
    return RefSpec(record["algo"], config_lib.build(algo_spec(record["algo"]).config, record["config"]))
