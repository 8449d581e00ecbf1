"""Helpers shared by the algorithm tests: a compiled multi-seed run, an agent with its compiled
update, and a one-step bandit batch."""

import functools

import jax
import jax.numpy as jnp

from kl_rl import buffer, envs
from kl_rl.agents import ALGOS
from kl_rl.agents.base import UpdateContext
from kl_rl.train import make_train


def train(algo, env_id="CartPole-v1", seeds=1, **fields):
    """Runs `seeds` seeds of `algo` with `fields` set, as one jitted, vmapped program."""
    config = ALGOS[algo].config(**fields)
    fn = make_train(algo, config, envs.make(env_id))
    keys = jax.vmap(jax.random.key)(jnp.arange(seeds))
    return jax.jit(jax.vmap(fn, in_axes=(0, None)))(keys, config)


def counted_program(algo, config, env_id):
    """(jit(vmap(train)) of `algo` on `env_id` over seed keys with the config unbatched, the list
    that gains one entry each time it is traced): a sweep over traced fields compiles it once."""
    traces = []
    fn = make_train(algo, config, envs.make(env_id))

    def counted(key, cfg):
        traces.append(1)
        return fn(key, cfg)

    return jax.jit(jax.vmap(counted, in_axes=(0, None))), traces


@functools.cache
def _made(algo, env_id, fields):
    env = envs.make(env_id)
    config = ALGOS[algo].config(**dict(fields))
    agent = ALGOS[algo].make(config, env.observation_space, env.action_space)

    @jax.jit
    def update(key, state, traj, progress):
        return agent.update(key, state, traj, UpdateContext(progress))

    return config, agent, update


def made_agent(algo, env_id="CartPole-v1", **fields):
    """(config, agent, jitted update(key, state, traj, progress)) of `algo` with `fields` set, for
    `env_id`'s spaces (the update runs without a reference).

    Made once per process: the tests that update one agent on batches of one shape share its
    compiled program (a file that relies on it runs on one pytest-xdist worker)."""
    return _made(algo, env_id, tuple(sorted(fields.items())))


def bandit_batch(agent, state, num=64, every=2, obs=None):
    """A [1, num] batch of one-step episodes in which action 0 pays 1 and action 1 pays 0,
    collected by the agent's own policy (so the buffer holds its behaviour distribution).

    Action 1 is taken at every `every`-th step, action 0 at the others, whatever the policy
    prefers. Every observation is ones([4]) unless `obs` [1, num, 4] is given."""
    obs = jnp.ones((1, num, 4), jnp.float32) if obs is None else obs
    action, log_prob, dist = agent.act(jax.random.key(3), state, obs[0])
    action = (jnp.arange(num) % every == 0).astype(action.dtype)
    log_prob = dist.log_prob(action)
    reward = (action == 0).astype(jnp.float32)
    return buffer.Transition(
        obs=obs,
        action=action[None],
        reward=reward[None],
        terminated=jnp.ones((1, num), bool),
        truncated=jnp.zeros((1, num), bool),
        next_obs=obs,
        value=agent.value(state, obs),
        log_prob=log_prob[None],
        dist=jax.tree.map(lambda x: x[None], dist),
    )
