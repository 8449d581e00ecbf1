"""`kl_rl.run`: a multi-seed run from Python, through the one pipeline (`kl_rl.pipeline`).

>>> import kl_rl
>>> result = kl_rl.run("ppo", "CartPole-v1", seeds=4, total_steps=50_000)
>>> result.final_returns          # [seeds], mean over the evaluation episodes
>>> result.save("runs/ppo-cartpole")
"""

import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from kl_rl import pipeline, resolve, sources
from kl_rl.errors import ConfigError
from kl_rl.runfolder import RunResult, run_record


def run(
    algo: str = "ppo",
    env: str = "CartPole-v1",
    seeds: int = 1,
    config: Any = None,
    config_file: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    env_path: str = "auto",
    vectorization: str = "sync",
    devices: int | None = None,
    batching: str | None = None,
    reference: str | os.PathLike | dict | None = None,
    reference_seed: int | None = None,
    init_from: str | os.PathLike | dict | None = None,
    run_sources: sources.RunSources | None = None,
    **overrides: Any,
) -> RunResult:
    """Trains `seeds` seeds (0 .. seeds-1), spread over the local devices (`kl_rl.parallel`).

    The run is a few compiled programs (init, a segment of updates, evaluate), each compiled
    once; the segments run back to back and progress is reported between them. On CPU a
    seed's result depends only on its seed and config, not on the number of seeds or devices.

    Args:
      algo: algorithm name (see `kl_rl.agents.ALGOS`).
      env: env id: a JAX port (see `kl_rl.envs.ENV_IDS`) or any gymnasium id, which runs on the
        host-side path (gymnasium envs stepped through callbacks from the same program).
      seeds: number of seeds.
      config: a ready config; if None it is resolved from the preset, `config_file` and
        `overrides` (field names as keywords, e.g. lr=3e-4, total_steps=100_000).
      progress: optional `progress(env_steps_done, env_steps_total)`, summed over seeds, called
        once the programs are compiled and after each segment (`kl_rl.cli.progress.Bar` draws it).
      checkpoint_dir: a run folder to checkpoint into (`<checkpoint_dir>/checkpoints/<update>`).
        If it already holds a checkpoint of this run, training resumes from the newest one.
        The final state is always saved there.
      checkpoint_every: updates between checkpoints (0: only the final state).
      env_path: "auto" (the JAX port where there is one), "jax" or "host" (see `kl_rl.envs.make`).
      vectorization: how the host path steps its copies: "sync", or "async" (one process each).
      devices: how many local devices to use (default all; on CPU see
        `kl_rl.parallel.use_cpu_devices`).
      batching: how the seeds of one device run: "map" (one after another; on CPU a seed's
        bits then depend on nothing else) or "vmap" (as one batch: faster, but a seed's bits
        may depend on the batch). None: "map" on CPU, "vmap" on accelerators (`kl_rl.parallel`).
      reference: a run folder of the same env whose final policy is the frozen reference the
        config's ref_kl_* penalty pulls toward (`kl_rl.sources`); seed s uses its seed s mod n.
      reference_seed: the reference run's seed that every seed uses instead.
      init_from: a run folder whose parameters and normalizers the run starts from.
      run_sources: instead of the three above, what `kl_rl.sources.resolve_sources` made of them.

    Raises:
      ConfigError: bad input, before anything trains.
    """
    if not isinstance(seeds, int) or seeds <= 0:
        raise ConfigError(f"{{seeds}} must be a positive integer, got {seeds!r}", "seeds")
    opts = pipeline.RunOptions(env_path=env_path, vectorization=vectorization, devices=devices, batching=batching,
                               reference=reference, reference_seed=reference_seed, init_from=init_from)  # fmt: skip
    if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ConfigError(f"{{checkpoint_every}} must be a non-negative integer, got {checkpoint_every!r}",
                          "checkpoint_every")  # fmt: skip
    env_obj = opts.make_env(env)
    if config is None:
        config = resolve.resolve_config(algo, env, config_file, overrides, env_path)
    else:
        resolve.check_config(algo, env, env_obj, config)
    if run_sources is None:
        run_sources = opts.sources(algo, env, config)
    group = pipeline.group(algo, env, env_obj, config, run_sources, seeds, opts.devices, batching=opts.batching)
    trainer = group.trainer
    steps_per_update = trainer.steps_per_update * seeds
    total = config.num_updates * steps_per_update
    checkpoints = None
    if checkpoint_dir is not None:
        record = run_record(algo, env, seeds, config, trainer.env_path, run_sources.records)
        checkpoints = pipeline.Checkpoints(checkpoint_dir, checkpoint_every, record)

    def report(updates_done: int) -> None:
        if progress is not None:
            progress(updates_done * steps_per_update, total)

    keys = jax.vmap(jax.random.key)(np.arange(seeds))
    try:
        outcome = pipeline.execute(
            group, keys, [config] * seeds, report, lambda: run_sources.setup(list(range(seeds))), checkpoints
        )
    finally:
        group.close()
    host = trainer.env_path == "host"
    programs = group.programs
    return RunResult(
        algo=algo,
        env_id=env,
        config=config,
        seeds=list(range(seeds)),
        metrics={k: np.asarray(v) for k, v in outcome.metrics.items()},
        eval_returns=np.asarray(outcome.eval_returns),
        wall_time_s=outcome.wall_time_s,
        compile_time_s=programs.compile_time_s,
        final_state=outcome.state,
        env_path=trainer.env_path,
        vectorization=vectorization,
        env_time_s=trainer.vec_env.env_seconds + trainer.eval_env.env_seconds if host else None,
        devices=len(group.layout.devices),
        batching=group.layout.mode,
        compiled_from_cache=programs.loaded == len(programs.compiled),
        sources=run_sources.records,
    )
