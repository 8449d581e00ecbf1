"""Times stable-baselines3's PPO on CartPole-v1 as an outside anchor for kl_rl's PPO timings.

Standalone (does not import kl_rl). Hyperparameters are rl-baselines3-zoo's tuned CartPole-v1 entry
in `hyperparams/ppo.yml` (below; checked against the zoo at commit 00128b5d): 8 envs x 32 steps,
one 256-transition minibatch, 20 epochs, and `lin_0.001` / `lin_0.2`, the zoo's linear schedules
(value x progress_remaining, so 1e-3 -> 0 and 0.2 -> 0 over training). kl_rl's `ppo` preset for
CartPole-v1 is the same settings, except that its clip range stays at 0.2. CPU only, with --threads
torch threads (default 1, as in sb3_trpo.py). Reports the wall time of `model.learn` alone
(learn_s) and with env + model construction (total_s), then the mean return of the final policy
over 16 deterministic episodes on a fresh CartPole-v1 (reset seeds 0..15), as one JSON object.

Setup, outside the repo (tested: torch 2.13.0+cpu, sb3 2.9.2, gymnasium 1.4.0):

    python3 -m venv /work/anchors/sb3venv
    /work/anchors/sb3venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    /work/anchors/sb3venv/bin/pip install sb3-contrib stable-baselines3 gymnasium

    /work/anchors/sb3venv/bin/python experiments/anchors/sb3_ppo.py --seed 0 --json sb3_ppo_s0.json
"""

from collections.abc import Callable

from stable_baselines3 import PPO
import sb3_common

N_ENVS = 8


def linear(initial: float) -> Callable[[float], float]:
    """The zoo's `lin_<value>`: `initial` scaled by SB3's progress_remaining (1 at start, 0 at end)."""
    return lambda progress_remaining: progress_remaining * initial


# rl-baselines3-zoo hyperparams/ppo.yml, CartPole-v1 (n_envs 8, n_timesteps 1e5, MlpPolicy).
HYPERPARAMS = dict(
    n_steps=32,
    batch_size=256,
    gae_lambda=0.8,
    gamma=0.98,
    n_epochs=20,
    ent_coef=0.0,
    learning_rate=linear(1e-3),
    clip_range=linear(0.2),
)


if __name__ == "__main__":
    sb3_common.main(__doc__.splitlines()[0], "sb3 PPO", PPO, N_ENVS, HYPERPARAMS, {})
