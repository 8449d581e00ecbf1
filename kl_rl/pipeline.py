"""The one pipeline under `kl_rl.run`, `kl_rl.sweep.run_sweep` and `kl_rl.tune.run_tune`.

    plan          every item's config (`kl_rl.resolve`) and the run's sources (`kl_rl.sources`);
                  items whose static fields agree form a group (`resolve.group_by_static`)
    programs      a group's trainer, its layout over the local devices and its compiled
                  programs, cached under `program_key` (`group`)
    segments      a batch of the group's items: init (or resume), segments of updates, the
                  final evaluation, with hooks between segments (`execute`)

An item is one run of `train`: a seed, a (grid point, seed) or a (trial, seed). The drivers
differ only in their items and hooks: a run checkpoints (`Checkpoints`), a sweep runs its groups
in chunks, tuning prunes between rungs. Progress goes to a callback; divergence is tracked for
every item the same way (`kl_rl.divergence`), and a batch whose items have all diverged stops.
"""

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from kl_rl import config as config_lib
from kl_rl import distributed, envs, parallel, sources
from kl_rl.divergence import first_nonfinite
from kl_rl.errors import ConfigError
from kl_rl.train import Trainer, make_trainer

CACHE_ENV = "KL_RL_CACHE_DIR"


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """What every driver takes beside its config: where the env runs, on which devices, and the
    runs it starts from or is held to. `kl_rl.run` takes these as keywords, and so do
    `kl_rl.sweep.run_sweep` and `kl_rl.tune.run_tune` (their `**options`).
    """

    env_path: str = "auto"
    """"auto" (the JAX port where there is one), "jax" or "host" (see `kl_rl.envs.make`)."""
    vectorization: str = "sync"
    """How the host path steps its copies: "sync", or "async" (one process each)."""
    devices: int | None = None
    """How many local devices to use (default all; on CPU see `kl_rl.parallel.use_cpu_devices`)."""
    batching: str | None = None
    """How a device's items run: "map" (one after another) or "vmap" (batched); None for the
    platform's default (`kl_rl.parallel.layout`)."""
    reference: Any = None
    """A run folder (or its loaded record) of the same env whose final policy is the frozen
    reference that the config's ref_kl_* penalty pulls toward; seed s uses its seed s mod n."""
    reference_seed: int | None = None
    """The reference run's seed that every seed uses instead."""
    init_from: Any = None
    """A run folder whose parameters and normalizers the run starts from."""

    def __post_init__(self) -> None:
        parallel.check_batching(self.batching)

    def make_env(self, env_id: str) -> Any:
        """The env on the chosen path (`kl_rl.envs.make`)."""
        return envs.make(env_id, self.env_path, self.vectorization)

    def sources(self, algo: str, env_id: str, config: Any) -> sources.RunSources:
        """The reference and starting runs, loaded and checked against `config`."""
        return sources.resolve_sources(
            algo, env_id, config, self.reference, self.reference_seed, self.init_from, self.env_path
        )


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


def program_key(algo: str, env: str, env_path: str, config: Any, sources: Any = None) -> tuple:
    """What names a trainer's programs in the program cache (`kl_rl.parallel.Programs`)."""
    key = (algo, env, env_path, json.dumps(config_lib.to_dict(config), sort_keys=True, default=str))
    return key if sources is None or not sources.records else (*key, sources.cache_key)


class Group(NamedTuple):
    """One static group's trainer, its layout over the devices, and its compiled programs.

    Every batch of the group (a sweep's chunks, tuning's batches) runs through these programs;
    a batch holds exactly `layout.items` items (pad short ones with copies of their last item).
    `group(...)` builds one for a command.
    """

    trainer: Trainer
    layout: parallel.Layout
    programs: parallel.Programs

    @property
    def compile_time_s(self) -> float:
        return self.programs.compile_time_s

    def close(self) -> None:
        """Closes the host-side envs (gymnasium's vector envs, their worker processes)."""
        for vec in (self.trainer.vec_env, self.trainer.eval_env):
            if hasattr(vec, "close"):
                vec.close()


def group(
    algo: str, env_id: str, env: Any, config: Any, sources: Any, items: int, devices: Any = None,
    batching: str | None = None,
) -> Group:  # fmt: skip
    """The `Group` of `config`'s static fields for batches of `items` items.

    Args:
      algo, env_id: the run's names; `env` what `kl_rl.envs.make` made of them.
      config: one config of the group (its static fields fix the programs).
      sources: the run's `kl_rl.sources.RunSources`.
      items: the items of every batch.
      devices: a device count or list, or None for every local device (`parallel.layout`).
      batching: how a device's items run, "map" or "vmap", or None for the platform's default
        (`parallel.layout`). The layout, and so the program cache's file names, record it.
    """
    trainer = make_trainer(algo, config, env, sources.reference)
    lay = parallel.layout(items, devices, host_env=trainer.env_path == "host", batching=batching)
    key = program_key(algo, env_id, trainer.env_path, config, sources)
    return Group(trainer, lay, parallel.Programs(trainer, lay, enable_compilation_cache(), key))


class Segment(NamedTuple):
    """What a hook sees after each segment of a batch."""

    done: int
    """Updates done by every item."""
    num_updates: int
    """Updates of the whole run."""
    state: Any
    """The train states, padded items axis leading (device arrays)."""
    metrics: dict[str, Any]
    """This segment's metrics, [padded items, updates of the segment] (device arrays)."""
    history: list[dict[str, Any]]
    """Every segment's metrics so far, this one last (`joined` makes them one table)."""
    layout: parallel.Layout
    """The batch's layout (`parallel.unpad` drops its padding)."""


class Hook:
    """Acts between the segments of a batch. A driver's hooks run in the order it gives them."""

    def after_segment(self, segment: Segment) -> bool:
        """Called once a segment has been dispatched; True stops the batch (no evaluation follows)."""
        return False


class Checkpoints(Hook):
    """The checkpoint writer: saves the state every `every` updates (0: only the last) and resumes.

    Args:
      directory: the run folder (`<directory>/checkpoints/<update>`).
      every: updates between checkpoints.
      record: what the checkpoints record of their run (`kl_rl.runfolder.run_record`); a
        checkpoint of another run is refused on resume.
    """

    def __init__(self, directory: str | os.PathLike, every: int, record: dict[str, Any]):
        from kl_rl.checkpoint import Checkpointer  # orbax: 0.3 s of imports a plain run need not pay

        self.every = every
        self.record = record
        # Of several processes (`kl_rl.distributed`), process 0 writes the checkpoints, of the
        # states gathered from all; every process reads them to resume, on a shared filesystem.
        # A checkpoint holds every item whole, so any count of processes and devices resumes it.
        main = distributed.is_main()
        self.checkpointer = Checkpointer(directory) if main else None
        distributed.barrier("checkpoints-created")
        self.checkpointer = self.checkpointer or Checkpointer(directory, read_only=True)

    def resume(self, group: Group, keys: jax.Array, configs: Sequence[Any]) -> tuple[Any, int, list] | None:
        """(state, updates done, [saved metrics]) from the newest checkpoint, or None for a fresh start.

        Raises:
          ConfigError: the checkpoints are of another run.
        """
        ckpt = self.checkpointer
        latest = ckpt.latest()
        if latest is None:
            return None
        saved = ckpt.record(latest)
        other_sources = ({"reference", "init_from"} & set(saved)) - set(self.record)
        if {k: saved.get(k) for k in self.record} != self.record or other_sources:
            raise ConfigError(
                f"the checkpoints in {ckpt.directory} are of another run ({saved.get('algo')} on "
                f"{saved.get('env')}, {saved.get('seeds')} seed(s)); resume with that run's settings"
            )
        # A resumed run needs init's shapes only, not a compiled init.
        one = jax.eval_shape(group.trainer.init, keys[0], configs[0])
        template = jax.tree.map(lambda x: jax.ShapeDtypeStruct((len(configs), *x.shape), x.dtype), one)
        state, saved_metrics = ckpt.restore(latest, template)
        return state, latest, [saved_metrics]

    def after_segment(self, segment: Segment) -> bool:
        every = self.every or segment.num_updates
        if segment.done % every == 0 or segment.done == segment.num_updates:
            lay = segment.layout
            # Gathering is a collective: every process takes part; process 0 writes.
            state, metrics = parallel.unpad(segment.state, lay), joined(segment.history, lay)
            if distributed.is_main():
                self.checkpointer.save(segment.done, state, metrics, self.record)
        return False

    def close(self) -> None:
        """Waits for every started save, then closes the checkpointer."""
        try:
            self.checkpointer.wait()
        finally:
            self.checkpointer.close()


class Outcome(NamedTuple):
    """A batch's results, real items only (padding dropped), items axis leading."""

    state: Any
    metrics: dict[str, np.ndarray]
    """[items, updates] per metric; fewer updates if the batch stopped early."""
    eval_returns: np.ndarray | None
    """[items, eval_episodes] returns of the final policies; None if a hook stopped the batch."""
    wall_time_s: float
    """The batch's time without compilation."""
    diverged: list[int | None]
    """Per item, the first update that went non-finite (`kl_rl.divergence.first_nonfinite`), or None."""


def execute(
    group: Group,
    keys: jax.Array,
    configs: Sequence[Any],
    progress: Callable[[int], None] | None = None,
    setup: Callable[[], Any] | None = None,
    checkpoints: Checkpoints | None = None,
    hooks: Sequence[Hook] = (),
    plan: Sequence[int] | None = None,
) -> Outcome:
    """Runs one batch of a group's items: init (or resume), segments of updates, evaluate.

    Each item's key is split as `train` splits it, so an item's result is `train(key, config)`'s.

    Args:
      group: the group's programs; its layout holds len(keys) items.
      keys: [items] PRNG keys.
      configs: one config per item, all sharing the group's static fields.
      progress: optional `progress(updates_done)`, called once the programs are compiled and
        after each segment completes.
      setup: optional `setup() -> kl_rl.train.Setup` for the items (their reference policy and
        starting parameters, `RunSources.setup`); called only when the batch starts afresh.
      checkpoints: the checkpoint writer; the batch resumes from its newest checkpoint.
      hooks: run after each segment, after the checkpoint writer; one returning True stops the batch.
      plan: the segments' update counts; default: cut at checkpoints and evaluation points, else
        about 20 equal segments (`parallel.segments`).

    Returns:
      The batch's `Outcome`. Once every item has gone non-finite no further segment starts.
    """
    programs, lay, trainer = group.programs, group.layout, group.trainer
    num_updates = configs[0].num_updates
    init_keys, eval_keys = (parallel.pad(k, lay) for k in jax.vmap(jax.random.split, out_axes=1)(keys))
    stacked = parallel.pad(parallel.stack(configs), lay)
    report = progress or (lambda updates_done: None)
    # Evaluation points (config.eval_every, token tasks) end segments, as checkpoints do.
    eval_every = configs[0].rollout.eval_every
    every = checkpoints.every if checkpoints is not None else 0
    step = math.gcd(every, eval_every) if every and eval_every else (every or eval_every)
    compile_before = programs.compile_time_s
    start = time.perf_counter()
    hooks = ([checkpoints] if checkpoints is not None else []) + list(hooks)
    try:
        done, history = 0, []
        resumed = checkpoints.resume(group, keys, configs) if checkpoints is not None else None
        if resumed is None:
            items_setup = setup() if setup is not None else None
            items_setup = None if items_setup is None else parallel.pad(items_setup, lay)
            programs.prepare(init_keys, stacked, plan or parallel.segments(num_updates, step), setup=items_setup)
            state = programs.init(init_keys, stacked, items_setup)
        else:
            state, done, history = resumed
            state = parallel.pad(state, lay)
            programs.prepare(init_keys, stacked, plan or parallel.segments(num_updates - done, step), state)
            if trainer.env_path == "host":
                # The gymnasium envs' own state is not in the checkpoint: start new episodes.
                restart_keys = jax.vmap(lambda k: jax.random.fold_in(k, done))(init_keys)
                state = programs.restart_envs(restart_keys, state)
        # Without checkpoints every run is cut the same way, so progress or not, the same bits.
        lengths = plan or parallel.segments(num_updates - done, step)
        report(done)
        pending = None  # the last dispatched segment's metrics and the updates done after it
        diverged = np.zeros(lay.items, bool)

        def finish(segment_metrics, updates_done) -> bool:
            """Waits for a segment, reports it; True once every item has gone non-finite."""
            flags = np.asarray(distributed.to_host(segment_metrics["nonfinite"]))[: lay.items]
            report(updates_done)
            diverged[:] |= flags.any(axis=1)
            return bool(diverged.all())

        stopped = False
        for n in lengths:
            state, metrics = programs.run(state, stacked, n)
            done += n
            if eval_every:
                # The held-out score of the policy at this point, in the segment's last row.
                scores = np.full((lay.items, n), np.nan, np.float32)
                if done % eval_every == 0 and done < num_updates:
                    point_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(eval_keys, done)
                    point_returns = distributed.to_host(programs.evaluate(point_keys, state, stacked))
                    scores[:, -1] = np.asarray(point_returns)[: lay.items].mean(axis=1)
                metrics = {**metrics, "eval_return": scores}
            history.append(metrics)
            segment = Segment(done, num_updates, state, metrics, history, lay)
            stops = [hook.after_segment(segment) for hook in hooks]  # every hook runs, whatever the others say
            stopped = any(stops)
            # The next segment is already dispatched when the previous one is waited for.
            all_diverged = pending is not None and finish(*pending)
            pending = (metrics, done)
            if stopped or all_diverged:
                break  # a hook stopped the batch, or every item diverged: what follows would be NaN too
        if pending is not None:
            finish(*pending)
        eval_returns = None
        if not stopped:
            returns = jax.block_until_ready(programs.evaluate(eval_keys, state, stacked))
            eval_returns = np.asarray(parallel.unpad(returns, lay))
        wall = time.perf_counter() - start - (programs.compile_time_s - compile_before)
        metrics = joined(history, lay)
    finally:
        if checkpoints is not None:
            checkpoints.close()
    return Outcome(parallel.unpad(state, lay), metrics, eval_returns, wall, first_nonfinite(metrics))


def joined(history: list[Any], lay: parallel.Layout) -> dict[str, np.ndarray]:
    """Per-segment metrics (device or host arrays) as one host dict of [items, updates] arrays."""
    parts = [{k: np.asarray(v)[: lay.items] for k, v in distributed.to_host(h).items()} for h in history]
    return {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}
