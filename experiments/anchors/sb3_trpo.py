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

import argparse
import json
import time

import gymnasium as gym
import numpy as np
import sb3_contrib
import stable_baselines3
import torch
from sb3_contrib import TRPO
from stable_baselines3.common.env_util import make_vec_env

ENV_ID = "CartPole-v1"
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
EVAL_EPISODES = 16


def evaluate(model: TRPO, episodes: int) -> list[float]:
    env = gym.make(ENV_ID)
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=ep)
        done, total = False, 0.0
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--total-steps", type=int, default=100_000)
    parser.add_argument("--json", type=str, default=None, help="write the result here as well")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    env = make_vec_env(ENV_ID, n_envs=N_ENVS, seed=args.seed)  # DummyVecEnv
    model = TRPO("MlpPolicy", env, seed=args.seed, device="cpu", verbose=0, **HYPERPARAMS)
    t1 = time.perf_counter()
    model.learn(total_timesteps=args.total_steps)
    t2 = time.perf_counter()
    env.close()

    returns = evaluate(model, EVAL_EPISODES)
    result = {
        "impl": "sb3-contrib TRPO",
        "seed": args.seed,
        "total_steps": args.total_steps,
        "learn_s": t2 - t1,
        "total_s": t2 - t0,
        "final_return": float(np.mean(returns)),
        "returns": returns,
        "versions": {
            "torch": torch.__version__,
            "stable_baselines3": stable_baselines3.__version__,
            "sb3_contrib": sb3_contrib.__version__,
            "gymnasium": gym.__version__,
        },
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
