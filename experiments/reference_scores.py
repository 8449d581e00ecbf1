"""Mean return of the uniform random policy on each env, the `low` of kl_rl.analysis.REFERENCE_SCORES.

    python experiments/reference_scores.py [--episodes 100] [--seed 0]

Runs `--episodes` episodes of uniformly random actions (discrete: uniform over actions; Box:
uniform over [low, high]) in kl_rl's JAX ports, each env's first full episode counted, and
prints each env's mean return with its standard error.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from kl_rl import envs
from kl_rl.envs import VecEnv


def random_returns(env_id: str, episodes: int, seed: int) -> np.ndarray:
    """[episodes] undiscounted returns of the uniform random policy, one episode per env copy."""
    vec = VecEnv(envs.make(env_id), episodes)
    space = vec.action_space
    horizon = vec.max_episode_steps

    def act(key):
        if hasattr(space, "n"):
            return jax.random.randint(key, (episodes,), 0, space.n)
        low, high = jnp.asarray(space.low), jnp.asarray(space.high)
        return jax.random.uniform(key, (episodes, *space.shape), minval=low, maxval=high)

    def step(carry, key):
        state, returns, finished = carry
        act_key, env_key = jax.random.split(key)
        state, out = vec.step(env_key, state, act(act_key))
        done = out.terminated | out.truncated
        returns = jnp.where(done & ~finished, out.episode_return, returns)
        return (state, returns, finished | done), None

    @jax.jit
    def run(key):
        reset_key, steps_key = jax.random.split(key)
        carry = (vec.reset(reset_key), jnp.zeros(episodes), jnp.zeros(episodes, bool))
        (_, returns, finished), _ = jax.lax.scan(step, carry, jax.random.split(steps_key, horizon))
        return returns, finished

    returns, finished = run(jax.random.key(seed))
    assert bool(finished.all()), "every episode ends within the time limit"
    return np.asarray(returns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for env_id in envs.ENV_IDS:
        returns = random_returns(env_id, args.episodes, args.seed)
        sem = returns.std(ddof=1) / np.sqrt(len(returns))
        print(f"{env_id:<26} random policy: {returns.mean():9.2f} +- {sem:6.2f} (mean +- s.e., {len(returns)} eps.)")


if __name__ == "__main__":
    main()
