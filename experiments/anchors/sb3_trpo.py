"""Times sb3-contrib's TRPO on CartPole-v1 as an outside anchor for kl_rl's TRPO timings.

Standalone (does not import kl_rl). Hyperparameters are rl-baselines3-zoo's tuned CartPole-v1 entry
in `hyperparams/trpo.yml` (below); it does not set target_kl, so sb3-contrib's default 0.01 is
passed explicitly. CPU only, with --threads torch threads (default 1: on this 2-core machine
one thread ran `learn` faster than two, 26 s against 30 s). Reports the wall time of `model.learn`
alone (learn_s) and with env + model construction (total_s), then the mean return of the final
policy over 16 deterministic episodes on a fresh CartPole-v1 (reset seeds 0..15), as one JSON object.

Setup, outside the repo (tested: torch 2.13.0+cpu, sb3 / sb3-contrib 2.9.2, gymnasium 1.4.0):

    python3 -m venv /work/anchors/sb3venv
    /work/anchors/sb3venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    /work/anchors/sb3venv/bin/pip install sb3-contrib stable-baselines3 gymnasium

    /work/anchors/sb3venv/bin/python experiments/anchors/sb3_trpo.py --seed 0 --json sb3_trpo_s0.json
"""

import sb3_contrib
from sb3_contrib import TRPO
import sb3_common

# rl-baselines3-zoo hyperparams/trpo.yml, CartPole-v1 (target_kl is sb3-contrib's default).
HYPERPARAMS = dict(
    n_steps=512,
    batch_size=512,
    gamma=0.99,
    gae_lambda=0.98,
    n_critic_updates=20,
    cg_damping=1e-3,
    learning_rate=1e-3,
    target_kl=0.01,
)
N_ENVS = 2


if __name__ == "__main__":
    versions = {"sb3_contrib": sb3_contrib.__version__}
    sb3_common.main(__doc__.splitlines()[0], "sb3-contrib TRPO", TRPO, N_ENVS, HYPERPARAMS, versions)
