"""What the SB3 anchors share: train one model on CartPole-v1, evaluate it, print one JSON line.

Standalone (does not import kl_rl); imported by sb3_ppo.py and sb3_trpo.py from their folder.
"""

import argparse
import json
import time
from typing import Any

import gymnasium as gym
import numpy as np
import stable_baselines3
import torch
from stable_baselines3.common.env_util import make_vec_env

ENV_ID = "CartPole-v1"
EVAL_EPISODES = 16


def evaluate(model: Any, episodes: int) -> list[float]:
    """Undiscounted returns of deterministic episodes on a fresh env, reset seeds 0..episodes-1."""
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


def main(description: str, impl: str, model_cls: Any, n_envs: int, hyperparams: dict, versions: dict) -> None:
    """Parses --seed, --total-steps, --json, --threads; trains, evaluates and prints the result."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--total-steps", type=int, default=100_000)
    parser.add_argument("--json", type=str, default=None, help="write the result here as well")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    env = make_vec_env(ENV_ID, n_envs=n_envs, seed=args.seed)  # DummyVecEnv
    model = model_cls("MlpPolicy", env, seed=args.seed, device="cpu", verbose=0, **hyperparams)
    t1 = time.perf_counter()
    model.learn(total_timesteps=args.total_steps)
    t2 = time.perf_counter()
    env.close()

    returns = evaluate(model, EVAL_EPISODES)
    result = {
        "impl": impl,
        "seed": args.seed,
        "total_steps": args.total_steps,
        "env_steps": int(model.num_timesteps),
        "threads": args.threads,
        "learn_s": t2 - t1,
        "total_s": t2 - t0,
        "final_return": float(np.mean(returns)),
        "returns": returns,
        "versions": {
            "torch": torch.__version__,
            "stable_baselines3": stable_baselines3.__version__,
            "gymnasium": gym.__version__,
            **versions,
        },
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
