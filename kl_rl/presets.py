"""Tuned defaults for each (algo, env) pair in the benchmarks.

A preset only lists what differs from the algorithm's dataclass defaults. Values were chosen by
the benchmark sweeps recorded in docs/benchmarks.md; a file or command-line value overrides them.
"""

from typing import Any

PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    # rl-baselines3-zoo's tuned CartPole settings (8 envs x 32 steps, one 256-minibatch, 20 epochs).
    ("ppo", "CartPole-v1"): dict(
        total_steps=100_000,
        num_envs=8,
        num_steps=32,
        num_minibatches=1,
        update_epochs=20,
        gamma=0.98,
        gae_lambda=0.8,
        lr=1e-3,
        ent_coef=0.0,
    ),
    ("ppo", "Pendulum-v1"): dict(
        total_steps=200_000,
        num_envs=4,
        num_steps=1024,
        num_minibatches=64,
        update_epochs=10,
        gamma=0.9,
        gae_lambda=0.95,
        lr=1e-3,
        ent_coef=0.0,
        normalize_obs=True,
    ),
}


def preset(algo: str, env_id: str) -> dict[str, Any]:
    """The preset for (algo, env), or an empty dict where there is none."""
    return dict(PRESETS.get((algo, env_id), {}))
