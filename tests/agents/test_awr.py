"""AWR (kl_rl/agents/awr.py): its weights, the KL-constrained step they solve, the replay it reads,
and a tiny run whose leash is traced."""

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kl_rl import buffer, envs, kl
from kl_rl.agents.awr import AWRConfig, awr, awr_weights
from kl_rl.buffer import Transition
from kl_rl.distributions import Categorical
from kl_rl.errors import ConfigError
from kl_rl.train import make_train
from .common import counted_program

# Tiny: 2 envs x 8 steps a rollout, 6 updates, a buffer of 32 transitions (16 items of 2 envs).
TINY = dict(total_steps=96, num_envs=2, num_steps=8, hidden_sizes=(16, 16), buffer_size=32, batch_size=8,
            critic_steps=3, actor_steps=4, eval_episodes=2)  # fmt: skip


def test_weights_are_clipped_exponentials_of_the_advantages_over_beta():
    adv = jnp.array([-2.0, 0.0, 1.0, 3.0, 50.0])
    valid = jnp.array([True, True, True, True, True])
    w, _ = awr_weights(adv, valid, 0.5, 20.0, normalize=False)
    np.testing.assert_allclose(w, [np.exp(-4.0), 1.0, np.exp(2.0), 20.0, 20.0], rtol=1e-6)
    # A larger beta flattens the weights (the leash tightens towards behaviour cloning).
    loose, _ = awr_weights(adv, valid, 5.0, 20.0, normalize=False)
    assert np.std(np.asarray(loose)) < np.std(np.asarray(w))


def test_normalization_and_weights_ignore_the_invalid_entries():
    adv = jnp.array([1.0, 2.0, 3.0, 1e6])
    valid = jnp.array([True, True, True, False])
    w, norm = awr_weights(adv, valid, 1.0, 20.0, normalize=True)
    expected = (np.array([1.0, 2.0, 3.0]) - 2.0) / (np.std([1.0, 2.0, 3.0]) + 1e-5)
    np.testing.assert_allclose(norm[:3], expected, rtol=1e-5)
    np.testing.assert_allclose(w, [*np.exp(expected), 0.0], rtol=1e-5)


def test_weighted_regression_solves_the_kl_constrained_step():
    # At one state with behaviour mu and advantages A, max_pi E_{a ~ mu}[exp(A / beta) log pi(a)]
    # is pi* proportional to mu exp(A / beta): the solution of max E_pi[A] - beta KL(pi || mu)
    # (Peng et al. 2019, eq. 5-8). A larger beta keeps pi* closer to mu.
    mu = jnp.array([0.5, 0.3, 0.2])
    adv = jnp.array([0.0, 1.0, -1.0])
    opt = optax.adam(0.05)

    def fit(beta):
        w, _ = awr_weights(adv, jnp.ones(3, bool), beta, 1e9, normalize=False)

        def loss(logits):
            return -jnp.sum(mu * w * jax.nn.log_softmax(logits))

        def step(carry, _):
            logits, state = carry
            updates, state = opt.update(jax.grad(loss)(logits), state)
            return (optax.apply_updates(logits, updates), state), None

        logits0 = jnp.zeros(3)
        (logits, _), _ = jax.lax.scan(step, (logits0, opt.init(logits0)), None, length=3000)
        return jax.nn.softmax(logits)

    kls = []
    for beta in (0.5, 1.0, 4.0):
        target = mu * jnp.exp(adv / beta)
        np.testing.assert_allclose(fit(beta), target / target.sum(), atol=1e-4)
        kls.append(float(kl.kl_divergence(Categorical(jnp.log(target / target.sum())), Categorical(jnp.log(mu)))))
    assert kls[0] > kls[1] > kls[2] > 0


def _replay(obs, size, insert_pos):
    """A CartPole-shaped replay of 6 items x 2 envs holding `obs`."""
    cap, n = obs.shape[:2]
    rng = np.random.default_rng(0)
    data = Transition(
        obs=obs, action=jnp.asarray(rng.integers(0, 2, (cap, n)), jnp.int32),
        reward=jnp.ones((cap, n)), terminated=jnp.zeros((cap, n), bool),
        truncated=jnp.zeros((cap, n), bool).at[2, 0].set(True), next_obs=obs, value=jnp.zeros((cap, n)),
        log_prob=jnp.full((cap, n), np.log(0.5)), dist=Categorical(jnp.zeros((cap, n, 2))),
    )  # fmt: skip
    return buffer.BufferState(data=data, insert_pos=jnp.asarray(insert_pos, jnp.int32),
                              size=jnp.asarray(size, jnp.int32))  # fmt: skip


def test_update_reads_only_the_filled_part_of_the_replay():
    # Three of six items written (slots 0-2); slots 3-5 hold garbage that must never reach the update.
    space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
    config = AWRConfig(**{**TINY, "buffer_size": 12})
    agent = awr(config, space, gym.spaces.Discrete(2))
    state = agent.init(jax.random.key(0))
    obs = jnp.asarray(np.random.default_rng(1).normal(size=(6, 2, 4)), jnp.float32)
    ctx = None
    update = jax.jit(agent.update, static_argnums=3)
    clean, m_clean = update(jax.random.key(1), state, _replay(obs.at[3:].set(0.0), 3, 3), ctx)
    dirty, m_dirty = update(jax.random.key(1), state, _replay(obs.at[3:].set(jnp.nan), 3, 3), ctx)
    for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(dirty), strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(np.isfinite(float(v)) for v in m_dirty.values())
    assert float(m_clean["replay_size"]) == 6.0
    # The same three items stored after a wrap (slots 4, 5, 0 of a buffer written up to slot 1) give
    # the same update: the buffer is read oldest first from its insert position.
    wrapped = jnp.full_like(obs, jnp.nan).at[jnp.array([4, 5, 0])].set(obs[:3])
    replay = _replay(wrapped, 3, 1)
    replay = replay.replace(
        data=replay.data._replace(
            action=jnp.roll(replay.data.action, 4, axis=0), truncated=jnp.roll(replay.data.truncated, 4, axis=0)
        )
    )
    rolled, _ = update(jax.random.key(1), state, replay, ctx)
    for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(rolled), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_cartpole_run_logs_its_kls_and_a_traced_beta_compiles_once():
    config = AWRConfig(**TINY)
    program, traces = counted_program("awr", config, "CartPole-v1")
    keys = jax.vmap(jax.random.key)(jnp.arange(1))
    out = program(keys, config)
    tight = program(keys, config.replace(beta=0.05))
    assert len(traces) == 1  # beta is traced: a sweep over the leash is one program
    m = out.metrics
    for name in ("kl", "behaviour_kl", "weight_mean", "weight_max", "clipped_fraction", "policy_loss", "vf_loss"):
        assert np.all(np.isfinite(m[name])), name
    # The replay persists across updates: 16 transitions an update, up to the 32 it holds.
    np.testing.assert_array_equal(m["replay_size"][0], np.minimum(16 * np.arange(1, 7), 32))
    # beta reached the program: a small beta spreads the weights and clips more of them.
    assert float(tight.metrics["weight_max"][0, -1]) > float(m["weight_max"][0, -1])
    assert np.all(np.isfinite(out.eval_returns))


def test_config_errors_name_the_field():
    space = envs.make("CartPole-v1").action_space
    with pytest.raises(ConfigError, match="buffer_size"):
        AWRConfig(**{**TINY, "buffer_size": 8}).validate(space)
    with pytest.raises(ConfigError, match="beta"):
        AWRConfig(**{**TINY, "beta": 0.0}).validate(space)
    with pytest.raises(ConfigError, match="normalize_reward"):
        AWRConfig(**{**TINY, "normalize_reward": True}).validate(space)
    with pytest.raises(ConfigError, match="network"):  # its update regresses on single steps
        AWRConfig(**{**TINY, "network": "gru"}).validate(space)
    AWRConfig(**TINY).validate(space)


@pytest.mark.slow
def test_awr_learns_cartpole():
    # A sixth of the preset's budget (10 updates), 4 seeds: a random policy scores about 20; the
    # preset's 16-seed median is in docs/benchmarks.md.
    config = AWRConfig(total_steps=10_240)
    train = make_train("awr", config, envs.make("CartPole-v1"))
    out = jax.jit(jax.vmap(train, in_axes=(0, None)))(jax.vmap(jax.random.key)(jnp.arange(4)), config)
    returns = np.asarray(out.eval_returns).mean(axis=1)
    assert np.median(returns) >= 200, returns
