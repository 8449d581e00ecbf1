"""Config resolution: dataclass defaults < preset < file < overrides, checked against the env.

Every run, sweep point and tune trial gets its config here, and `static_key` groups configs that
can share compiled programs (`kl_rl.pipeline`).
"""

import dataclasses
import os
from typing import Any

from kl_rl import config as config_lib
from kl_rl import envs
from kl_rl.agents import SEQUENCE_ALGOS, algo_spec
from kl_rl.errors import ConfigError
from kl_rl.presets import preset


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
    check_config(algo, env_id, env, config)
    return config


def check_config(algo: str, env_id: str, env: Any, config: Any) -> None:
    """Checks a built config against its algo and env (what `resolve_config` checks after building).

    Raises:
      ConfigError: a token task with a control algo or the reverse, an invalid value for this
        env's action space, env params the env does not have, more evaluation episodes than a
        task's held-out set, a replay window or policy lag as long as the run.
    """
    check_task_algo(algo, env_id, env)
    config.validate(env.action_space)
    check_env_params(env, env_id, config)
    if getattr(config, "images", False):
        envs.with_images(env, env_id)
    check_staleness(config)
    if envs.is_token_space(env.observation_space) and config.eval_episodes > env.held_out_size:
        raise ConfigError(
            f"{{eval_episodes}} {config.eval_episodes} exceeds {env_id}'s {env.held_out_size} held-out problems; "
            f"use at most {env.held_out_size}",
            "eval_episodes",
        )


def check_staleness(config: Any) -> None:
    """ConfigError for a replay window or a policy lag that reaches the run's number of updates.

    With `replay_rollouts` K >= the updates, the window never fills with fresh data (and the
    first update tiles its rollout K times); with `policy_lag` L >= the updates, the initial
    policy acts throughout.
    """
    updates, spec = config.num_updates, config.rollout
    for name, value in (("replay_rollouts", spec.replay_rollouts), ("policy_lag", spec.policy_lag)):
        if value >= updates and (name == "policy_lag" or value > 1):
            raise ConfigError(
                f"{{{name}}} {value} is not below the run's {updates} updates; lower it or raise {{total_steps}}",
                name,
                "total_steps",
            )


def check_env_params(env: Any, env_id: str, config: Any) -> None:
    """ConfigError for env params a host env cannot take or `env` does not have."""
    if not (config.rollout.env_params and config.env_params):
        return
    overrides = config.env_params
    if envs.path_of(env) == "host":
        raise ConfigError(f"env params are set inside JAX; {env_id} runs on the host path (use a JAX env)")
    envs.check_env_params(env, env_id, overrides)


def check_task_algo(algo: str, env_id: str, env: Any) -> None:
    """ConfigError unless a token-task algo meets a token task, and a control algo a control env."""
    task = envs.is_token_space(env.observation_space)
    if task and algo not in SEQUENCE_ALGOS:
        raise ConfigError(f"{env_id} is a token task; train it with {{algo}} {' | '.join(SEQUENCE_ALGOS)}", "algo")
    if algo in SEQUENCE_ALGOS and not task:
        raise ConfigError(f"{{algo}} {algo} trains on token tasks ({', '.join(envs.TASK_IDS)}), not {env_id}", "algo")


def static_key(config: Any) -> tuple:
    """The values of a config's static fields: configs sharing it share one compiled program."""
    cls = type(config)
    fields = dataclasses.fields(cls)
    return tuple((f.name, getattr(config, f.name)) for f in fields if config_lib.is_static(cls, f.name))


def group_by_static(configs: list[Any]) -> dict[tuple, list[int]]:
    """{static key: indices of `configs` that share it}, in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, config in enumerate(configs):
        groups.setdefault(static_key(config), []).append(i)
    return groups
