"""Hyperparameter search with Optuna: TPE sampling and median pruning, trials batched into vmapped programs.

    >>> space = kl_rl.tune.parse_space("ppo", ["lr=log:1e-5:1e-2", "clip_eps=0.1:0.3", "num_minibatches=4,8"])
    >>> result = kl_rl.tune.run_tune("ppo", "CartPole-v1", space, trials=32, batch_size=8, seeds=4,
    ...                              storage="sqlite:///study.db", study_name="ppo-cartpole")
    >>> result.best        # {"number", "params", "value"}: the best trial of the whole study

The search follows rl-baselines3-zoo: a TPE sampler proposes hyperparameters, a median pruner
stops trials whose training return falls below the median of finished trials at the same env
step, and the objective is the mean over seeds of the final policy's mean evaluation return --
the final_return of `kl-rl train`, so a trial's value is what training that config gives.

Trials are asked from the study `batch_size` at a time. A batch's trials that share the static
fields (shapes, loop counts) are stacked into one config pytree and run as one program, `vmap`ped
over trials (outer) and seeds (inner) exactly as `kl_rl.sweep` does. Each trial's updates run in
`rungs` segments; after each, every trial reports the mean over seeds of its latest training
episode return and asks the pruner. A pruned trial inside a group that goes on costs the same as
a live one (the vmapped program runs every member), so pruning saves compute only when a whole
group is pruned, and the group then stops. The compiled programs of a static group are kept
across batches; a group is padded to the batch size with copies of its last config (dropped
afterwards), so every batch reuses them.

Several workers can share a study through one storage: a database URL (the same SQLite file,
or a PostgreSQL/MySQL server for workers on several hosts), or `journal:PATH`, Optuna's journal
file on a filesystem every host mounts (NFS), which needs no database server. Each worker asks
its own trials, and TPE and the pruner see every worker's results.
"""

import dataclasses
import re
import time
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kl_rl import config as config_lib
from kl_rl import distributed, divergence, pipeline, resolve, runfolder, stats
from kl_rl.agents import algo_spec
from kl_rl.errors import ConfigError
from kl_rl.train import make_trainer

SPACE_FORMS = "NAME=LOW:HIGH, NAME=log:LOW:HIGH or NAME=V1,V2,... (e.g. lr=log:1e-5:1e-2)"
BUDGET_FIELDS = ("total_steps", "iterations")
TOP = 10  # best trials of the study kept in TuneResult.top
STORAGE_ATTEMPTS = 5  # tries at opening a storage that other workers are creating at the same moment
JOURNAL = "journal:"
"""The prefix of a journal file storage: journal:PATH, e.g. journal:/shared/studies/ppo.log."""
STORAGE_FORMS = "a database URL Optuna accepts (e.g. sqlite:///study.db) or journal:PATH (a journal file)"


def require_optuna() -> Any:
    """The optuna module, or a ConfigError saying how to install it (it is an optional extra)."""
    try:
        import optuna
    except ImportError:
        raise ConfigError("kl-rl tune needs Optuna; install it with pip install 'kl_rl[tune]'") from None
    return optuna


def parse_space(algo: str, items: list[str]) -> dict[str, Any]:
    """{name: Optuna distribution} from CLI items.

    NAME=LOW:HIGH is uniform (integers for an int field), NAME=log:LOW:HIGH log-uniform, and
    NAME=V1,V2,... categorical; tuple fields join widths with ':' (hidden_sizes=64:64,32:32),
    and their choices are kept as those strings, since Optuna's choices must be scalars.
    Every distinct value of a static field (num_envs, num_minibatches, hidden_sizes, ...) is a
    program of its own, so give those a few choices rather than a range.

    Raises:
      ConfigError: a malformed item, an unknown or repeated name, a budget field, LOW >= HIGH,
        a log range with LOW <= 0, a range over a non-numeric field, or a value of the wrong type.
    """
    distributions = require_optuna().distributions
    cls = algo_spec(algo).config
    types = config_lib._field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    space: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name, text = name.strip().lstrip("-").replace("-", "_"), text.strip()
        if not sep or not name or not text:
            raise ConfigError(f"malformed {{space}} item {item!r}; write {SPACE_FORMS}", "space")
        if name not in names:
            raise ConfigError(
                f"unknown hyperparameter {name!r} for {cls.__name__} in {{space}} (see kl-rl train --help)", "space"
            )
        if name in space:
            raise ConfigError(f"{{space}} names {name!r} twice; give its range or values in one item", "space")
        if name in BUDGET_FIELDS:
            raise ConfigError(
                f"{{space}} cannot vary {name}; every trial trains for one budget, set with {{{name}}}", "space", name
            )
        typ = types[name]
        is_tuple = typing.get_origin(typ) is tuple
        if is_tuple or "," in text or ":" not in text:
            values = [v.strip() for v in text.split(",")]
            if not all(values):
                raise ConfigError(f"malformed {{space}} item {item!r}; write {SPACE_FORMS}", "space")
            parsed = [config_lib.parse_value(name, v.replace(":", ",") if is_tuple else v, typ) for v in values]
            space[name] = distributions.CategoricalDistribution([_choice(v) for v in parsed])
            continue
        parts = [p.strip() for p in text.split(":")]
        log = parts[0] == "log"
        bounds = parts[1:] if log else parts
        if len(bounds) != 2 or not all(bounds):
            raise ConfigError(f"malformed {{space}} item {item!r}; write {SPACE_FORMS}", "space")
        if typ not in (int, float):
            raise ConfigError(
                f"{{space}} {name}={text}: a range needs a numeric field, but {name} is "
                f"{getattr(typ, '__name__', typ)}; list its values instead ({name}=V1,V2)",
                "space",
            )
        low, high = (config_lib.parse_value(name, b, typ) for b in bounds)
        if low >= high:
            raise ConfigError(
                f"{{space}} {name}={text}: LOW must be below HIGH; write {name}=LOW:HIGH with LOW < HIGH", "space"
            )
        if log and low <= 0:
            raise ConfigError(f"{{space}} {name}={text}: a log range needs LOW > 0; raise LOW or drop 'log:'", "space")
        kind = distributions.IntDistribution if typ is int else distributions.FloatDistribution
        space[name] = kind(low, high, log=log)
    return space


def _choice(value: Any) -> Any:
    """A categorical choice as Optuna keeps it: a scalar (a tuple as "64:64")."""
    return ":".join(str(v) for v in value) if isinstance(value, tuple) else value


def describe(distribution: Any) -> str:
    """The --space text of an Optuna distribution (the inverse of `parse_space` for one item)."""
    if hasattr(distribution, "choices"):
        return ",".join(str(c) for c in distribution.choices)
    prefix = "log:" if distribution.log else ""
    return f"{prefix}{distribution.low}:{distribution.high}"


def to_overrides(algo: str, params: dict[str, Any]) -> dict[str, Any]:
    """A trial's params as config overrides: tuple fields' "64:64" choices become "64,64"."""
    types = config_lib._field_types(algo_spec(algo).config)
    return {
        name: value.replace(":", ",") if typing.get_origin(types[name]) is tuple else value
        for name, value in params.items()
    }


@dataclasses.dataclass
class TuneResult:
    """A worker's part of a study: its own trials, and the study's best trial when it finished."""

    algo: str
    env_id: str
    study_name: str
    storage: str | None
    space: dict[str, Any]
    seeds: list[int]
    base_config: Any
    trials: list[dict[str, Any]]
    """This worker's trials in the order asked: number, state, params, value, final_return (per
    seed, None unless complete), pruned_at_env_steps (None unless pruned), env_steps (per seed,
    those its group trained: a pruned trial's group may go on), error (FAIL only), diverged
    ([{"seed", "update"}], a trial whose seeds went non-finite: FAIL in the study)."""
    best: dict[str, Any] | None
    """{"number", "params", "value"} of the study's best complete trial, any worker's; None if none."""
    top: list[dict[str, Any]]
    """The study's best complete trials (up to 10, any worker's), best first, as `best`."""
    study_counts: dict[str, int]
    """Trials of the whole study by state (COMPLETE, PRUNED, FAIL, RUNNING, ...)."""
    compiled_programs: int
    wall_time_s: float
    sources: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The reference and starting runs' records (`kl_rl.sources.RunSources.records`)."""
    batching: str | None = None
    """How each device ran its (trial, seed) items: "map" or "vmap" (`kl_rl.parallel`); None if
    this worker trained nothing (every trial failed validation)."""
    metrics: dict[int, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    """Per trial number of this worker that trained, its per-update metrics, each [seeds,
    updates]: up to the rung it was pruned at, else the updates its group ran."""

    def diverged_items(self) -> list[dict[str, Any]]:
        """Every (trial, seed) of this worker that went non-finite, with its first non-finite update."""
        return [{"trial": t["number"], **d} for t in self.trials for d in t.get("diverged", [])]

    @property
    def env_steps(self) -> int:
        """Env steps this worker trained, summed over trials and seeds (padding excluded)."""
        return sum(t["env_steps"] for t in self.trials) * len(self.seeds)

    def rows(self) -> list[dict[str, Any]]:
        """metrics.csv's rows: one per trial of this worker, hyperparameters as columns."""
        rows = []
        for t in self.trials:
            final = t["final_return"]
            rows.append(
                {
                    "number": t["number"],
                    "state": t["state"],
                    **{name: t["params"].get(name) for name in self.space},
                    "value": t["value"],
                    "final_return_mean": float(np.mean(final)) if final else None,
                    "final_return_iqm": stats.iqm(final) if final else None,
                    "pruned_at_env_steps": t["pruned_at_env_steps"],
                }
            )
        return rows

    def summary(self) -> dict[str, Any]:
        """summary.json's content."""
        return {
            "algo": self.algo,
            "env": self.env_id,
            "study_name": self.study_name,
            "storage": self.storage,
            "seeds": self.seeds,
            "best": self.best,
            "top": self.top,
            "study_trials": self.study_counts,
            "trials": self.trials,
            "diverged": self.diverged_items(),
            "compiled_programs": self.compiled_programs,
            "batching": self.batching,
            "env_steps": self.env_steps,
            "wall_time_s": self.wall_time_s,
            **self.sources,
            "optuna_version": require_optuna().__version__,
            **runfolder.provenance(),
        }

    def config_dict(self) -> dict[str, Any]:
        """config.json's content: the search space over the base config."""
        space = {name: describe(d) for name, d in self.space.items()}
        base = config_lib.to_dict(self.base_config)
        run = {"algo": self.algo, "env": self.env_id, "seeds": self.seeds, "batching": self.batching, "space": space}
        return {**run, **self.sources, **base}

    def save(self, out_dir: Any) -> Path:
        """Writes config.json, metrics.csv (one row per trial) and summary.json, atomically."""
        return runfolder.write_run_folder(out_dir, self.config_dict(), self.rows(), self.summary())


def open_study(storage: str | None, study_name: str, sampler_seed: int | None = 0, startup_trials: int = 10) -> Any:
    """Creates or loads a maximizing study with a seeded TPE sampler and a median pruner.

    Args:
      storage: a database URL Optuna accepts (sqlite:///study.db, postgresql://...);
        journal:PATH for Optuna's journal file at PATH (absolute, or relative to the working
        folder), which workers on several hosts can share on a network filesystem; or None for
        an in-memory study no other worker can see.
      study_name: the study to create, or to join if the storage already holds it.
      sampler_seed: seed of the sampler; workers sharing a study should each have their own,
        or their random startup trials coincide. None draws one.
      startup_trials: random trials before TPE models the results, and finished trials before
        the pruner prunes.

    Raises:
      ConfigError: the storage cannot be opened (bad URL, missing driver, unreachable server,
        unwritable file), or holds `study_name` as a minimizing study.
    """
    optuna = require_optuna()
    with warnings.catch_warnings():
        # constant_liar (experimental in Optuna 4): trials asked while others of the batch, or of
        # another worker, still run are steered away from them instead of repeating them.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=startup_trials, constant_liar=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=startup_trials)
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            study = optuna.create_study(
                storage=_storage(storage), study_name=study_name, direction="maximize", load_if_exists=True,
                sampler=sampler, pruner=pruner,
            )  # fmt: skip
            break
        except Exception as err:  # any driver, SQLAlchemy or URL error: the storage is unusable
            if _racing(err) and attempt + 1 < STORAGE_ATTEMPTS:
                time.sleep(0.2 * (attempt + 1))
                continue
            lines = str(err).strip().splitlines()
            reason = lines[0] if lines else type(err).__name__
            message = f"cannot open Optuna storage {redact(storage)!r}: {reason}; give {STORAGE_FORMS}"
            raise ConfigError(message) from None
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError(
            f"study {study_name!r} in {redact(storage)!r} minimizes; give another {{study_name}}", "study_name"
        )
    return study


def _storage(storage: str | None) -> Any:
    """What `optuna.create_study` takes for `storage`: a URL as it is, journal:PATH as a
    `JournalStorage` over a `JournalFileBackend`.

    The journal file is an append-only log of the study's operations; Optuna's default lock for
    it (a symlink, created atomically on NFS too) serializes the workers' writes.

    Raises:
      ValueError, FileNotFoundError: journal: with no path, or a path whose folder does not
        exist (`open_study` turns either into a ConfigError).
    """
    if storage is None or not storage.startswith(JOURNAL):
        return storage
    path = storage.removeprefix(JOURNAL)
    if not path.strip():
        raise ValueError("journal: needs the path of the journal file, as journal:PATH")
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = Path(path).expanduser()
    if not path.parent.is_dir():  # the backend would create the file, but not its folder
        raise FileNotFoundError(f"no folder {str(path.parent)!r} for the journal file")
    return JournalStorage(JournalFileBackend(str(path)))


def _racing(err: Exception) -> bool:
    """Whether opening a storage failed because another worker was creating the same new database.

    Workers started together on a fresh database all create its tables and write its schema
    version; the losers fail on a duplicate, and succeed once they retry.
    """
    text = str(err)
    return type(err).__name__ == "IntegrityError" or "already exists" in text or "database is locked" in text


def rungs_plan(num_updates: int, rungs: int) -> list[int]:
    """Update counts of the rungs: equal segments, the remainder added to the last."""
    rungs = min(rungs, num_updates)
    size = num_updates // rungs
    return [size] * (rungs - 1) + [num_updates - size * (rungs - 1)]


class Pruner(pipeline.Hook):
    """Tuning's hook between rungs: each running trial reports its training return and may be
    pruned; a trial any of whose seeds went non-finite fails. The batch stops once no trial runs.

    Args:
      study: the Optuna study.
      members: the group's (trial, config, record) triples, trial-major; the batch holds
        `seeds` items per trial and may hold padding after them.
      seeds: items per trial.
      steps_per_update: env steps of one update of one item.
    """

    def __init__(self, study: Any, members: list, seeds: int, steps_per_update: int):
        self.study, self.members, self.seeds = study, members, seeds
        self.steps_per_update = steps_per_update

    def after_segment(self, segment: pipeline.Segment) -> bool:
        optuna = require_optuna()
        n = len(self.members) * self.seeds
        metrics = {k: np.asarray(v)[:n] for k, v in distributed.to_host(segment.metrics).items()}
        latest = metrics["episode_return"][:, -1].reshape(-1, self.seeds)
        diverged = divergence.first_nonfinite(metrics)
        first_update = segment.done - metrics["episode_return"].shape[1]
        env_steps = segment.done * self.steps_per_update
        last = segment.done == segment.num_updates
        for j, (trial, _, record) in enumerate(self.members):
            # Every member ran these steps: a pruned or failed trial's slot runs on with its group.
            record["env_steps"] = env_steps
            if record["state"] != "RUNNING":
                continue
            bad = [(s, first_update + u) for s, u in enumerate(diverged[j * self.seeds : (j + 1) * self.seeds])
                   if u is not None]  # fmt: skip
            if bad:
                seed, update = bad[0]
                error = f"diverged: seed {seed} at update {update} (non-finite values)"
                trial.set_user_attr("error", error)
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                record.update(state="FAIL", error=error, diverged=[{"seed": s, "update": u} for s, u in bad])
                continue
            finite = latest[j][np.isfinite(latest[j])]  # NaN until a seed's first episode ends
            if finite.size:
                trial.report(float(finite.mean()), step=env_steps)
            # Of several processes, process 0's pruner decides for all (`_Follower`).
            if not last and distributed.share(bool(trial.should_prune()) if distributed.is_main() else None):
                self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                record.update(state="PRUNED", pruned_at_env_steps=env_steps)
        return all(record["state"] != "RUNNING" for _, _, record in self.members)


def _run_group(study: Any, group: pipeline.Group, members: list, keys: jax.Array, size: int, rungs: int,
               progress: Callable[[int], None], run_sources: Any) -> int:  # fmt: skip
    """Trains one static group's (trial, config, record) triples as one batch, rung by rung.

    The batch's items are (trial, seed) pairs, trial-major, padded to `size` trials. Survivors
    are evaluated and told their value. Each outcome and the env steps its group trained are
    written into the trial's record.

    Returns:
      The updates the group ran (fewer than its budget when every trial was pruned or failed),
      and per member its metrics ({name: [seeds, updates]}), cut at the rung a pruned trial stopped.
    """
    seeds = keys.shape[0]
    configs = [c for _, c, _ in members]
    padded = configs + [configs[-1]] * (size - len(configs))
    pruner = Pruner(study, members, seeds, group.trainer.steps_per_update)
    outcome = pipeline.execute(
        group, jnp.tile(keys, size), [c for c in padded for _ in range(seeds)], progress,
        setup=lambda: run_sources.setup(list(range(seeds)) * size), hooks=[pruner],
        plan=rungs_plan(configs[0].num_updates, rungs),
    )  # fmt: skip
    if outcome.eval_returns is not None:
        returns = outcome.eval_returns.mean(axis=-1).reshape(size, seeds)
        for j, (trial, _, record) in enumerate(members):
            if record["state"] == "RUNNING":
                value = float(returns[j].mean())
                study.tell(trial, value)
                record.update(state="COMPLETE", value=value, final_return=[float(x) for x in returns[j]])
    records = [record for _, _, record in members]
    per_trial = trial_metrics(outcome.metrics, records, seeds, group.trainer.steps_per_update)
    return next(iter(outcome.metrics.values())).shape[1], per_trial


def trial_metrics(
    metrics: dict[str, np.ndarray], records: list[dict[str, Any]], seeds: int, steps_per_update: int
) -> list[dict[str, np.ndarray]]:
    """A batch's [items, updates] metrics split per trial, each [seeds, updates], cut at the rung a
    pruned trial was pruned at (its slot trains on with its group, but the trial has ended).

    Args:
      metrics: the batch's metrics, items trial-major (`seeds` per trial), padding after them.
      records: the batch's trials' records (`TuneResult.trials`), in batch order.
      seeds: items per trial.
      steps_per_update: env steps of one update of one item.
    """
    out = []
    for j, record in enumerate(records):
        pruned = record["pruned_at_env_steps"]
        updates = None if pruned is None else pruned // steps_per_update
        out.append({k: np.asarray(v)[j * seeds : (j + 1) * seeds, :updates] for k, v in metrics.items()})
    return out


def run_tune(
    algo: str,
    env: str,
    space: dict[str, Any],
    trials: int,
    batch_size: int,
    seeds: int,
    storage: str | None,
    study_name: str,
    config_file: Any = None,
    overrides: dict[str, Any] | None = None,
    rungs: int = 4,
    sampler_seed: int | None = 0,
    startup_trials: int = 10,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> TuneResult:
    """Runs `trials` trials of a study on seeds 0..seeds-1, `batch_size` trials per batch.

    A trial's value is the mean over seeds of the mean final evaluation return: what
    `kl_rl.run` with its params gives (each seed's key is split into init and eval keys as
    `train` splits it). A sampled config that fails validation (e.g. num_minibatches not
    dividing the batch) is told FAIL and logged, and the study goes on.

    Pruning compares trials at equal env steps (a rung ends at a multiple of num_envs x
    num_steps), so a space over those fields prunes each trial only against trials sharing its
    rungs. A pruned trial costs as much as a live one until every trial of its group is pruned.

    Args:
      algo, env: names as for `kl_rl.run`.
      space: {hyperparameter: Optuna distribution}, e.g. from `parse_space`.
      trials: trials this worker runs.
      batch_size: trials asked and run together.
      seeds: seeds per trial.
      storage, study_name, sampler_seed, startup_trials: as for `open_study`.
      config_file, overrides: the base config under the space (preset < file < overrides < params).
      rungs: segments of training, each followed by a report to the pruner.
      log: optional function receiving one line per batch, and one per failed trial.
      progress: optional `progress(env_steps_done, env_steps_total)` over all trials and seeds.
      **options: `kl_rl.pipeline.RunOptions` (env_path, vectorization, devices, batching,
        reference, reference_seed, init_from), as for `kl_rl.run`. On the host path a batch's trials keep
        their envs from rung to rung (a pruned trial's copies run on with its group); a batch's
        (trial, seed) items are spread over the devices; seed s of every trial takes the same
        reference and starting parameters.

    Raises:
      ConfigError: a bad count, base config or storage; all are checked before any training.
    """
    for name, value in (("trials", trials), ("batch_size", batch_size), ("seeds", seeds), ("rungs", rungs)):
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{{{name}}} must be a positive integer, got {value!r}", name)
    optuna = require_optuna()
    overrides = dict(overrides or {})
    opts = pipeline.RunOptions(**options)
    base = resolve.resolve_config(algo, env, config_file, overrides, opts.env_path)
    run_sources = opts.sources(algo, env, base)
    study = _open_shared(storage, study_name, sampler_seed, startup_trials)
    env_obj = opts.make_env(env)
    keys = jax.vmap(jax.random.key)(np.arange(seeds))
    size = batch_size  # every group is padded to this many trials, so its programs serve every batch
    log = log or (lambda line: None)
    groups_built: dict[tuple, pipeline.Group] = {}
    records: list[dict[str, Any]] = []
    histories: dict[int, dict[str, np.ndarray]] = {}  # trial number -> its metrics
    # Env steps over all trials and seeds: the total moves when a trial trains more or less than
    # the base config's budget (a space over num_steps, a failed config, a group stopped early).
    budget = base.num_updates * make_trainer(algo, base, env_obj).steps_per_update
    steps = {"done": 0, "total": trials * seeds * budget}
    start = time.perf_counter()
    try:
        for batch_start in range(0, trials, batch_size):
            compiled_before = sum(len(g.programs.compiled) for g in groups_built.values())
            batch: list[tuple[Any, dict[str, Any]]] = []  # (trial, its record), as asked
            groups: dict[tuple, list[tuple[Any, Any, dict[str, Any]]]] = {}  # static key -> its trials
            try:
                for _ in range(min(batch_size, trials - batch_start)):
                    trial = _ask(study, space)
                    batch.append((trial, _record(trial)))
                    records.append(batch[-1][1])
                for trial, record in batch:
                    try:
                        params = to_overrides(algo, trial.params)
                        config = resolve.resolve_config(algo, env, config_file, {**overrides, **params}, opts.env_path)
                    except ConfigError as err:
                        trial.set_user_attr("error", str(err))
                        study.tell(trial, state=optuna.trial.TrialState.FAIL)
                        record.update(state="FAIL", error=str(err))
                        steps["total"] -= seeds * budget
                        log(f"trial {trial.number} failed: {err}")
                        continue
                    groups.setdefault(resolve.static_key(config), []).append((trial, config, record))
                for key, members in groups.items():
                    if key not in groups_built:
                        groups_built[key] = pipeline.group(algo, env, env_obj, members[0][1], run_sources, size * seeds,
                                                           opts.devices, batching=opts.batching)  # fmt: skip
                    group = groups_built[key]
                    num_updates = members[0][1].num_updates
                    unit = group.trainer.steps_per_update * len(members) * seeds  # padded trials not counted
                    steps["total"] += len(members) * seeds * (num_updates * group.trainer.steps_per_update - budget)
                    before = steps["done"]

                    def report(updates_done, before=before, unit=unit):
                        steps["done"] = before + updates_done * unit
                        if progress is not None:
                            progress(steps["done"], steps["total"])

                    ran, per_trial = _run_group(study, group, members, keys, size, rungs, report, run_sources)
                    for (_, _, record), trial_metrics in zip(members, per_trial, strict=True):
                        histories[record["number"]] = trial_metrics
                    steps["total"] -= (num_updates - ran) * unit
                    for trial, _, record in members:
                        if "diverged" in record:
                            log(f"trial {trial.number} failed: {record['error']}")
            finally:
                # A trial left RUNNING in a shared storage (an error, Ctrl-C) would stay so for good.
                for trial, record in batch:
                    if record["state"] == "RUNNING":
                        study.tell(trial, state=optuna.trial.TrialState.FAIL)
                        record.update(state="FAIL", error="interrupted")
            compiled = sum(len(g.programs.compiled) for g in groups_built.values()) - compiled_before
            best = _best(study)
            best_text = f"best value {best['value']:.2f} (trial {best['number']})" if best else "no complete trial yet"
            outcome = ", ".join(f"{n} {s.lower()}" for s, n in _counts([r for _, r in batch]).items())
            log(
                f"batch {batch_start // batch_size + 1}/{-(-trials // batch_size)}: {len(batch)} trial(s) x "
                f"{seeds} seed(s) in {len(groups)} group(s), {compiled} program(s) compiled: {outcome}; {best_text}",
            )
    finally:
        for group in groups_built.values():
            group.close()
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    top = sorted(finished, key=lambda t: -t.value)[:TOP]
    return TuneResult(
        algo=algo,
        env_id=env,
        study_name=study_name,
        storage=redact(storage),
        space=space,
        seeds=list(range(seeds)),
        base_config=base,
        sources=run_sources.records,
        trials=records,
        best=_best(study),
        top=[{"number": t.number, "params": t.params, "value": t.value} for t in top],
        study_counts=_counts([{"state": t.state.name} for t in study.get_trials(deepcopy=False)]),
        compiled_programs=sum(len(g.programs.compiled) for g in groups_built.values()),
        wall_time_s=time.perf_counter() - start,
        batching=next((g.layout.mode for g in groups_built.values()), None),
        metrics=histories,
    )


class _Follower:
    """The study as the processes other than 0 of a joined run see it (`kl_rl.distributed`).

    Every process trains every batch, its (trial, seed) items spread over the devices of all;
    process 0 alone opens the study, asks the sampler, reports to the pruner and tells the
    results, and shares each trial's number and params (`distributed.share`), and each pruning
    decision. What the others tell goes nowhere.
    """

    class Trial(NamedTuple):
        number: int
        params: dict[str, Any]

        def report(self, value: float, step: int) -> None:
            pass

        def set_user_attr(self, key: str, value: Any) -> None:
            pass

    @property
    def best_trial(self) -> Any:
        raise ValueError("process 0 holds the study")

    def tell(self, *args: Any, **kwargs: Any) -> None:
        pass

    def get_trials(self, *args: Any, **kwargs: Any) -> list:
        return []


def _open_shared(storage: str | None, study_name: str, sampler_seed: int | None, startup_trials: int) -> Any:
    """`open_study` in process 0, a `_Follower` in the others; a storage that does not open is
    the same ConfigError in every process."""
    if jax.process_count() == 1:
        return open_study(storage, study_name, sampler_seed, startup_trials)
    study, error = _Follower(), None
    if distributed.is_main():
        try:
            study = open_study(storage, study_name, sampler_seed, startup_trials)
        except ConfigError as err:
            error = [err.template, *err.fields]
    error = distributed.share(error)
    if error is not None:
        raise ConfigError(*error)
    return study


def _ask(study: Any, space: dict[str, Any]) -> Any:
    """A new trial: asked of the study by process 0, the same trial's number and params in the others."""
    if isinstance(study, _Follower):
        number, params = distributed.share()
        return _Follower.Trial(number, params)
    trial = study.ask(space)
    distributed.share([trial.number, trial.params])
    return trial


def _record(trial: Any) -> dict[str, Any]:
    """A new trial's entry in TuneResult.trials, filled in as it finishes."""
    return {
        "number": trial.number,
        "state": "RUNNING",
        "params": dict(trial.params),
        "value": None,
        "final_return": None,
        "pruned_at_env_steps": None,
        "env_steps": 0,
    }


def _best(study: Any) -> dict[str, Any] | None:
    """The study's best complete trial (any worker's), or None before the first completes."""
    try:
        best = study.best_trial
    except ValueError:
        return None
    return {"number": best.number, "params": best.params, "value": best.value}


def _counts(records: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return counts


def redact(storage: str | None) -> str | None:
    """The storage URL with any password masked, for logs and summary.json."""
    return None if storage is None else re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", storage)
