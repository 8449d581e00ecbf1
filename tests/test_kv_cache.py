"""The token policy's KV cache (issue 26, item 4): sampling carries every layer's keys and values
as the policy state through the one collector, and gives the distributions that scoring a whole
response in one causal pass gives, on every token of a rollout that crosses episode boundaries;
greedy held-out answers are the same with and without it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kl_rl import buffer, envs, networks, normalize, resolve, rollout, train
from kl_rl.agents import ALGOS
from kl_rl.envs.tasks import EOS, PAD

# The first two tests read the same rollout (`_rollout` is cached): one worker, one compile.
pytestmark = pytest.mark.xdist_group("kv_cache")

ENV = "Addition-v0"
P, H = 8, 5
TINY = {"layers": 2, "width": 16, "heads": 2, "num_envs": 16, "eval_episodes": 32, "group_size": 4}


def _random(params, seed, scale=0.5):
    """Parameters far from the initialization (whose logits are near uniform), so that every
    token's distribution depends on the whole buffer before it."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [x + scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, moved)


@functools.cache
def _rollout(episodic: bool, kv_cache: bool = True, num_steps: int = 3 * H):
    """A GRPO trainer's collector run for `num_steps` (three response lengths, so envs finish
    episodes and start new prompts mid-rollout) with random policy parameters: episodic as the
    trainer runs it (`train.collect`: each env's first episode is what counts, and the cache is
    kept after it), or continuing (`rollout.collect` resetting the cache at every episode start)."""
    config = resolve.resolve_config("grpo", ENV, None, {**TINY, "total_steps": 16, "kv_cache": kv_cache})
    env = envs.make(ENV)
    vec_env = envs.vectorize(env, TINY["num_envs"], group_size=TINY["group_size"])
    agent = ALGOS["grpo"].make(config, vec_env.observation_space, vec_env.action_space)
    agent_state = jax.jit(agent.init)(jax.random.key(0))
    loop = train.Loop(ALGOS["grpo"].make, config.rollout, vec_env, None, 1, num_steps, 16 * num_steps, H, None,
                      None)  # fmt: skip
    collector = rollout.init_collector(vec_env.reset(jax.random.key(1)), vec_env.observation_space.shape)
    policy = _random(agent_state.params["policy"], 1)
    # EOS made likely, so that responses end (and new prompts start) at different steps.
    head = policy["params"]["head"]
    policy["params"]["head"] = {**head, "bias": head["bias"].at[EOS].add(5.0)}
    agent_state = agent_state.replace(params={"policy": policy})

    @jax.jit
    def collect(collector):
        collector = train.episodic_start(loop, config, agent, collector)
        if episodic:
            return train.collect(loop, jax.random.key(2), agent, agent_state, collector, num_steps, config)

        def act(key, obs, cache):
            return agent.act(key, agent_state, obs, cache)

        return rollout.collect(jax.random.key(2), act, vec_env, collector, num_steps, False,
                               initial_state=train.initial_state(loop, config, agent), keep_state=False)  # fmt: skip

    _, traj, _ = collect(collector)
    return config, agent, agent_state, traj


def _episode_buffers(traj):
    """[T, N, P + H]: at each step, the buffer its episode ends with (the final observation at
    the step that ends it; the last one for an episode the rollout cuts)."""

    def back(final, xs):
        next_obs, done = xs
        final = jnp.where(done[:, None], next_obs, final)
        return final, final

    done = traj.terminated | traj.truncated
    _, final = jax.lax.scan(back, traj.next_obs[-1], (traj.next_obs, done), reverse=True)
    return final


def _one_pass_log_probs(agent_state, traj):
    """Each step's log-prob of its token, from one causal pass over its episode's whole buffer
    (what the update's scorer does), read at the step's position."""
    policy, _ = networks.make_token_networks(envs.make(ENV).observation_space, envs.make(ENV).action_space,
                                             TINY["layers"], TINY["width"], TINY["heads"])  # fmt: skip

    @jax.jit
    def score(params, obs, final, action):
        logits = policy.sequence(params, final).logits  # [T, N, P + H, V]
        position = jnp.sum(obs != PAD, axis=-1).astype(jnp.int32) - 1
        at = jnp.take_along_axis(logits, position[..., None, None], axis=-2)[..., 0, :]
        return jnp.take_along_axis(jax.nn.log_softmax(at), action[..., None], -1)[..., 0]

    return score(agent_state.params["policy"], traj.obs, _episode_buffers(traj), traj.action)


def test_cached_sampling_and_one_pass_scoring_agree_on_every_token_across_episode_boundaries():
    _, _, agent_state, traj = _rollout(episodic=False)
    start = np.asarray(traj.start)
    # Episodes of a random policy end at different steps: the rollout starts many mid-way.
    assert start[0].all() and start[1:].sum() >= 16 and start[1:].any(axis=1).sum() >= 5
    assert traj.policy_state is None  # the update reads no cache: the trajectory keeps none
    one_pass = _one_pass_log_probs(agent_state, traj)
    sampled = np.asarray(traj.log_prob)
    assert np.all(np.isfinite(sampled))
    np.testing.assert_allclose(sampled, np.asarray(one_pass), rtol=0, atol=2e-5)
    # Not vacuous: the log-probs vary, token to token and episode to episode.
    assert np.std(sampled) > 0.3


def test_the_cache_is_the_policy_state_and_the_collector_resets_it_where_an_episode_starts():
    """Replaying the rollout's buffers through the sampler gives the recorded distributions when
    the cache is reset where `start` is set (`networks.reset_state`, as the collector does) and
    different ones when it is not: the reset is what the agreement above rests on."""
    _, agent, agent_state, traj = _rollout(episodic=False)
    initial = agent.initial_state(TINY["num_envs"])

    def replay(reset):
        def step(cache, xs):
            obs, start = xs
            if reset:
                cache = networks.reset_state(cache, initial, start)
            dist, cache = agent.policy(agent_state, obs, cache)
            return cache, dist.logits

        return jax.lax.scan(step, initial, (traj.obs, traj.start))[1]

    recorded = np.asarray(traj.dist.logits)
    finite = np.isfinite(recorded)
    with_reset, without = (np.asarray(jax.jit(functools.partial(replay, r))()) for r in (True, False))
    np.testing.assert_allclose(with_reset[finite], recorded[finite], rtol=0, atol=2e-5)
    restarted = np.asarray(traj.start)[1:].any(axis=1).sum()
    assert restarted and np.abs(without[finite] - recorded[finite]).max() > 0.5


def test_an_episodic_rollout_keeps_the_cache_after_the_first_episode_and_agrees_on_every_token_it_learns_from():
    """The trainer's rollout (first episodes only) prefills at its first step alone: the cache
    is not reset where an env's first episode ends. Every token of each env's first episode (what
    the update learns from, `buffer.in_first_episode`) is the one-pass score's, and the same token
    with the same log-prob as in the continuing rollout from the same keys."""
    _, _, agent_state, traj = _rollout(episodic=True)
    _, _, _, continuing = _rollout(episodic=False)
    first = np.asarray(buffer.in_first_episode(traj))
    start = np.asarray(traj.start)
    assert start[0].all() and not start[1:].any()
    # Not vacuous: many envs run past their first episode within the rollout.
    assert (~first).sum() >= 16 and (~first).any(axis=0).sum() >= 8
    np.testing.assert_array_equal(np.asarray(buffer.in_first_episode(continuing)), first)
    np.testing.assert_array_equal(np.asarray(traj.action)[first], np.asarray(continuing.action)[first])
    sampled = np.asarray(traj.log_prob)[first]
    np.testing.assert_allclose(sampled, np.asarray(continuing.log_prob)[first], rtol=0, atol=1e-6)
    np.testing.assert_allclose(sampled, np.asarray(_one_pass_log_probs(agent_state, traj))[first], rtol=0, atol=2e-5)
    assert np.std(sampled) > 0.3


@pytest.mark.parametrize("vmapped", [False, True])
def test_the_cached_step_is_the_uncached_policy_on_any_buffer(vmapped):
    """One step from a cache filled token by token equals `apply` on the same buffer, at every
    response length, for rows that prefill and rows that extend in the same batch, on steps
    where no row is fresh (the prefill skipped) too. Vmapped over two seeds of three rows each
    (as `--batching vmap` runs seeds), the restarting rows are all the first seed's: the
    second seed's rows must extend while the first seed's prefill."""
    env = envs.make(ENV)
    policy, _ = networks.make_token_networks(env.observation_space, env.action_space, 2, 16, 2)
    initial_state, step = networks.kv_sampler(env.observation_space, env.action_space, 2, 16, 2)
    params = _random(policy.init(jax.random.key(0), jnp.zeros((1, P + H))), 3)
    rng = np.random.default_rng(0)
    prompts = np.asarray(jax.vmap(env.problem_tokens)(jnp.asarray(rng.integers(0, 10**6, 6), jnp.int32)))
    responses = rng.choice([*range(10), 11, 12, 13], size=(6, H))
    apply = jax.jit(policy.apply)
    if vmapped:
        seeds = jax.jit(jax.vmap(step, in_axes=(None, 0, 0)))

        def cached(params, obs, cache):
            dist, cache = seeds(
                params, obs.reshape(2, 3, -1), jax.tree.map(lambda x: x.reshape(2, 3, *x.shape[1:]), cache)
            )
            return dist.logits.reshape(6, -1), jax.tree.map(lambda x: x.reshape(6, *x.shape[2:]), cache)
    else:
        jitted = jax.jit(step)

        def cached(params, obs, cache):
            dist, cache = jitted(params, obs, cache)
            return dist.logits, cache

    cache = initial_state(6)
    for t in range(H):
        # Rows 0 and 1 start a new episode (the same prompt) at t = 2: their cache is reset and
        # their buffer is the prompt again; the other rows extend theirs.
        written = np.where(np.arange(6) < 2, t - 2, t) if t >= 2 else np.full(6, t)
        if t == 2:
            cache = networks.reset_state(cache, initial_state(6), jnp.arange(6) < 2)
        obs = np.where(np.arange(H) < written[:, None], responses, PAD)
        obs = jnp.asarray(np.concatenate([prompts, obs], 1), jnp.float32)
        logits, cache = cached(params, obs, cache)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(apply(params, obs).logits), rtol=0, atol=2e-5)
        assert not np.asarray(cache.fresh).any()


def test_greedy_held_out_answers_are_identical_with_and_without_the_cache():
    env = envs.make(ENV)
    eval_env = envs.vectorize(env, 64, evaluation=True)
    answers = {}
    for kv_cache in (True, False):
        config = resolve.resolve_config("grpo", ENV, None, {**TINY, "total_steps": 16, "kv_cache": kv_cache})
        agent = ALGOS["grpo"].make(config, eval_env.observation_space, eval_env.action_space)
        assert (agent.initial_state is not None) == kv_cache
        agent_state = agent.init(jax.random.key(0))
        agent_state = agent_state.replace(params={"policy": _random(agent_state.params["policy"], 4)})
        policy = train.eval_policy(agent, agent_state, True)
        initial = None if agent.initial_state is None else agent.initial_state(eval_env.num_envs)
        obs_norm = normalize.init(eval_env.observation_space.shape)
        record = jax.jit(functools.partial(rollout.record, policy=policy, vec_env=eval_env, obs_norm=obs_norm,
                                           normalize_obs=False, max_steps=H, initial_state=initial))  # fmt: skip
        _, rec = record(jax.random.key(5))
        answers[kv_cache] = np.where(np.asarray(rec.running), np.asarray(rec.action), -1)
    np.testing.assert_array_equal(answers[True], answers[False])
    # Not vacuous: the greedy answers differ from problem to problem.
    assert len({tuple(a) for a in answers[True].T}) >= 5
