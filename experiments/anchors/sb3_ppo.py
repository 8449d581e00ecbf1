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

import argparse
import json
import time
from collections.abc import Callable

import gymnasium as gym
import numpy as np
import stable_baselines3
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

ENV_ID = "CartPole-v1"
N_ENVS = 8
EVAL_EPISODES = 16


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


def evaluate(model: PPO, episodes: int) -> list[float]:
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
    model = PPO("MlpPolicy", env, seed=args.seed, device="cpu", verbose=0, **HYPERPARAMS)
    t1 = time.perf_counter()
    model.learn(total_timesteps=args.total_steps)
    t2 = time.perf_counter()
    env.close()

    returns = evaluate(model, EVAL_EPISODES)
    result = {
        "impl": "sb3 PPO",
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
        },
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
