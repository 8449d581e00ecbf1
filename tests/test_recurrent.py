"""The carried policy state: the collector threads a recurrent policy's state, resets it where
episodes start, and the update's unroll recomputes exactly the distributions the policy acted with."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kl_rl import envs, kl, networks, train
from kl_rl.agents import ALGOS
from kl_rl.agents.common import actor_critic
from kl_rl.agents.ppo import PPOConfig
from kl_rl.errors import ConfigError


def _spaces():
    env = envs.make("CartPole-v1")
    return env.observation_space, env.action_space


@functools.cache
def _rollout(network: str, num_envs: int = 4, num_steps: int = 32, env_id: str = "CartPole-v1", **fields):
    """One rollout of a fresh PPO policy: the trainer's loop, its first collector state and the trajectory."""
    config = PPOConfig(total_steps=num_envs * num_steps, num_envs=num_envs, num_steps=num_steps, network=network,
                       num_minibatches=2, **fields)  # fmt: skip
    env = envs.make(env_id)
    trainer = train.make_trainer("ppo", config, env)
    state = jax.jit(trainer.init)(jax.random.key(0))
    # A fresh policy's head (gain 0.01) makes every action's probability ~1/2 whatever the
    # state; random policy weights make its log-probs depend on the state it carries.
    policy = state.agent.params["policy"]
    leaves, treedef = jax.tree.flatten(policy)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    policy = [0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    policy = jax.tree.unflatten(treedef, policy)
    state = state.replace(agent=state.agent.replace(params={**state.agent.params, "policy": policy}))
    loop = train.Loop(ALGOS["ppo"].make, config.rollout, trainer.vec_env, trainer.eval_env, 1, num_steps,
                      num_envs * num_steps, 1, None, None)  # fmt: skip
    agent = loop.agent(config)

    @jax.jit
    def collect(state):
        return train.collect(loop, jax.random.key(1), agent, state.agent, state.collector, num_steps, config)

    collector, traj, _ = collect(state)
    ac = actor_critic(config, trainer.vec_env.observation_space, trainer.vec_env.action_space)
    return config, ac, state, collector, traj


@pytest.mark.parametrize("network", ["gru", pytest.param("lstm", marks=pytest.mark.slow)])
def test_the_update_unroll_gives_the_collectors_log_probs_across_episode_boundaries(network):
    _, ac, state, _, traj = _rollout(network)
    start = np.asarray(traj.start)
    # Episodes of a random CartPole policy are short: the rollout holds boundaries.
    assert start[0].all() and start[1:].sum() >= 3
    env_major = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), traj)
    params = state.agent.params["policy"]
    log_prob = jax.jit(lambda p, t: ac.distribution(p, t).log_prob(t.action))(params, env_major)
    np.testing.assert_allclose(np.asarray(log_prob), np.asarray(env_major.log_prob), rtol=0, atol=2e-6)
    # A minibatch of two envs' whole sequences (what the update sees) gives the same.
    half = jax.tree.map(lambda x: x[2:], env_major)
    log_prob = jax.jit(lambda p, t: ac.distribution(p, t).log_prob(t.action))(params, half)
    np.testing.assert_allclose(np.asarray(log_prob), np.asarray(half.log_prob), rtol=0, atol=2e-6)
    # Without the resets the unroll is a different policy: the check above can fail.
    no_reset = env_major._replace(start=jnp.zeros_like(env_major.start).at[:, 0].set(True))
    log_prob = jax.jit(lambda p, t: ac.distribution(p, t).log_prob(t.action))(params, no_reset)
    assert np.abs(np.asarray(log_prob) - np.asarray(env_major.log_prob)).max() > 0.1


def test_the_state_is_reset_where_an_episode_starts_and_carried_elsewhere():
    _, _, _, collector, traj = _rollout("gru")
    state, start = np.asarray(traj.policy_state), np.asarray(traj.start)
    done = np.asarray(traj.terminated | traj.truncated)
    # A step starts an episode iff the previous one ended it.
    np.testing.assert_array_equal(start[1:], done[:-1])
    np.testing.assert_array_equal(np.asarray(collector.policy.start), done[-1])
    assert np.all(state[start] == 0.0)
    assert np.all(np.abs(state[~start]).max(axis=-1) > 0.0)


def test_the_collector_keeps_the_state_each_step_left_before_any_reset():
    *_, traj = _rollout("gru")
    state, after = np.asarray(traj.policy_state), np.asarray(traj.next_policy_state)
    done = np.asarray(traj.terminated | traj.truncated)
    assert done[:-1].sum() >= 3
    # Where the episode goes on, the state after a step is the one the next step acts with.
    np.testing.assert_array_equal(after[:-1][~done[:-1]], state[1:][~done[:-1]])
    # Where it ends, the next step starts from zeros, but the state after the step is kept: it
    # is what the last observation was read with, and what a truncated step bootstraps from.
    assert np.all(state[1:][done[:-1]] == 0.0)
    assert np.all(np.abs(after[:-1][done[:-1]]).max(axis=-1) > 0.0)


def test_a_critic_of_the_state_reads_the_state_the_policy_acted_with():
    config, ac, state, _, traj = _rollout("gru", critic_state=True)
    assert config.critic_state
    agent_state = state.agent
    # The collector's values are the critic's on the recorded states ...
    np.testing.assert_allclose(
        np.asarray(traj.value), np.asarray(ac.value(agent_state, traj.obs, traj.policy_state)), rtol=1e-6, atol=1e-6
    )
    # ... and the state matters to them; without critic_state it does not, and the critic is
    # the observation's MLP alone.
    other = jax.tree.map(lambda x: jnp.roll(x, 1, axis=1), traj.policy_state)
    assert np.abs(np.asarray(ac.value(agent_state, traj.obs, other) - traj.value)).max() > 1e-3
    blind = actor_critic(config.replace(critic_state=False), *_spaces())
    params = blind.init_params(jax.random.key(0))
    first_layer = [x.shape[0] for x in jax.tree.leaves(params["value"]) if x.ndim == 2]
    assert traj.obs.shape[-1] in first_layer and traj.obs.shape[-1] + 64 not in first_layer
    st = agent_state.replace(params=params)
    np.testing.assert_array_equal(blind.value(st, traj.obs, traj.policy_state), blind.value(st, traj.obs, other))
    with pytest.raises(ValueError, match="reads the policy's state"):
        ac.value(agent_state, traj.obs)


def test_a_truncated_step_bootstraps_from_the_state_after_it():
    from kl_rl.agents.common import advantages_and_returns

    config, ac, state, _, traj = _rollout("gru", critic_state=True)
    done = np.asarray(traj.terminated)
    assert done[:-1].sum() >= 3
    # The same steps, cut by a time limit instead: next_obs is then bootstrapped.
    cut = traj._replace(truncated=traj.terminated, terminated=jnp.zeros_like(traj.terminated))

    def value_fn(obs, *policy_state):
        return ac.value(state.agent, obs, *policy_state)

    _, _, returns = advantages_and_returns(value_fn, cut, config)
    returns = np.asarray(jnp.swapaxes(returns, 0, 1))  # back to [T, N]
    v_next = np.asarray(value_fn(traj.next_obs, traj.next_policy_state))
    want = np.asarray(traj.reward) + config.gamma * v_next
    np.testing.assert_allclose(returns[done], want[done], rtol=1e-5, atol=1e-5)
    # The state the next step starts from (zeros, after the reset) gives other bootstraps.
    v_reset = np.asarray(value_fn(traj.next_obs, jax.tree.map(jnp.zeros_like, traj.next_policy_state)))
    assert np.abs((np.asarray(traj.reward) + config.gamma * v_reset)[done] - returns[done]).max() > 1e-3


@pytest.mark.parametrize(
    "algo, critic_state", [("ppo", False), ("vpg", True), pytest.param("mdpo", False, marks=pytest.mark.slow)]
)
def test_an_update_with_zero_lr_recomputes_the_behaviour_policy_exactly(algo, critic_state):
    """Through the real update (env-major minibatches, the unroll in the loss): at lr 0 the
    policy it recomputes is the one that collected, so its KL to the behaviour policy is ~0.
    Both agents' params are {"policy", "value"}, so PPO's collected state serves VPG's update
    (VPG's with a critic of the state: its value regression reads the recorded states)."""
    from kl_rl.agents.base import UpdateContext

    _, _, state, _, traj = _rollout("gru", critic_state=critic_state)
    config = ALGOS[algo].config(
        total_steps=128, num_envs=4, num_steps=32, network="gru", lr=0.0, critic_state=critic_state
    )
    space = envs.make("CartPole-v1")
    agent = ALGOS[algo].make(config, space.observation_space, space.action_space)
    agent_state = agent.init(jax.random.key(0)).replace(params=state.agent.params)
    _, metrics = jax.jit(agent.update)(jax.random.key(2), agent_state, traj, UpdateContext(jnp.float32(0.0)))
    assert float(metrics["kl"]) < 1e-10 and float(metrics["kl_behaviour"]) < 1e-10
    assert np.isfinite(float(metrics["vf_loss"]))


def _trpo_objectives(traj, params, config, start=None):
    """TRPO's theta -> (surrogate, KL) on a [T, N] recurrent rollout, as its update builds it,
    with theta_old = `params`' policy; `start` replaces the episode-start flags (env-major)."""
    from jax.flatten_util import ravel_pytree

    from kl_rl.agents.common import advantages_and_returns
    from kl_rl.agents.trpo import surrogate_and_kl

    space = envs.make("CartPole-v1")
    ac = actor_critic(config, space.observation_space, space.action_space)
    env_major, advantages, _ = advantages_and_returns(
        lambda o, *s: ac.value_net.apply(params["value"], ac.critic_input(o, *s)), traj, config
    )
    if start is not None:
        env_major = env_major._replace(start=start)
    theta_old, unravel = ravel_pytree(params["policy"])
    objectives = surrogate_and_kl(ac.distribution, unravel, env_major, advantages, config, None)
    return objectives, theta_old, env_major, advantages, ac


def test_trpo_at_its_old_parameters_sees_kl_zero_to_the_behaviour_policy_on_a_recurrent_rollout():
    """The line search's candidates theta_old + c^j beta x tend to theta_old, whose KL to the
    policy that collected must be 0: the unroll through the sequence is the collector's policy."""
    from kl_rl.agents.trpo import TRPOConfig

    _, _, state, _, traj = _rollout("gru")
    config = TRPOConfig(total_steps=128, num_envs=4, num_steps=32, network="gru")
    params = state.agent.params
    objectives, theta_old, env_major, advantages, _ = _trpo_objectives(traj, params, config)
    surr, kl_value = jax.jit(objectives)(theta_old)
    # float32 rounding of a KL between equal distributions recomputed along 32 steps (seen 5.7e-10).
    assert abs(float(kl_value)) < 1e-8
    # Every ratio pi_theta_old(a) / pi_old(a) is 1, so the surrogate is the mean advantage.
    np.testing.assert_allclose(float(surr), float(jnp.mean(advantages)), rtol=1e-5, atol=1e-6)
    # Unrolled without the resets, the same parameters are another policy: the check can fail.
    no_reset = jnp.zeros_like(env_major.start).at[:, 0].set(True)
    objectives, *_ = _trpo_objectives(traj, params, config, start=no_reset)
    assert float(jax.jit(objectives)(theta_old)[1]) > 1e-3


def _sequence_kl_by_hand(net, params, old_logits, state0, obs, start):
    """mean KL(old || pi) of a GRU policy stepped one step at a time (a scan over time, not a
    Python loop, so its Hessian compiles one step), its state zeroed at each flagged step: the
    sequence KL written without networks.unroll."""

    def step(state, xs):
        obs_t, start_t, old_logits_t = xs
        state = jnp.where(start_t[:, None], 0.0, state)
        dist, state = net.apply(params, obs_t, state)
        old = jax.nn.log_softmax(old_logits_t)
        return state, jnp.sum(jnp.exp(old) * (old - jax.nn.log_softmax(dist.logits)))

    time_major = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), (obs, start, old_logits))
    _, per_step = jax.lax.scan(step, state0, time_major)
    return jnp.sum(per_step) / (obs.shape[0] * obs.shape[1])


def test_trpo_fisher_vector_product_through_the_sequence_is_the_hessian_of_the_sequence_kl():
    """On a tiny GRU policy and two short sequences (one with an episode start inside), the
    Fisher-vector product of TRPO's own KL (`surrogate_and_kl`, through `ActorCritic.distribution`)
    equals the dense Hessian of the sequence KL written step by step, at and near theta_old."""
    import gymnasium as gym
    from jax.flatten_util import ravel_pytree

    from kl_rl import buffer
    from kl_rl.agents.trpo import TRPOConfig, fisher_vector_product, surrogate_and_kl

    config = TRPOConfig(hidden_sizes=(4,), network="gru", num_envs=2, num_steps=6, total_steps=12)
    obs_space, act_space = gym.spaces.Box(-1.0, 1.0, (2,)), gym.spaces.Discrete(3)
    ac = actor_critic(config, obs_space, act_space)
    params = ac.init_params(jax.random.key(0))["policy"]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = [0.7 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    params = jax.tree.unflatten(treedef, params)
    n, t = 2, 6
    obs = jax.random.normal(jax.random.key(2), (n, t, 2))
    start = jnp.zeros((n, t), bool).at[:, 0].set(True).at[1, 3].set(True)
    state0 = jnp.zeros((n, 4)).at[0].set(jax.random.normal(jax.random.key(3), (4,)))
    start = start.at[0, 0].set(False)  # env 0's rollout begins mid-episode, from a carried state
    theta_old, unravel = ravel_pytree(params)
    old = jax.jit(networks.unroll, static_argnums=0)(ac.policy_net, params, state0, obs, start)
    traj = buffer.Transition(
        obs=obs, action=jnp.zeros((n, t), jnp.int32), reward=jnp.zeros((n, t)), terminated=jnp.zeros((n, t), bool),
        truncated=jnp.zeros((n, t), bool), next_obs=obs, log_prob=old.log_prob(jnp.zeros((n, t), jnp.int32)),
        value=jnp.zeros((n, t)), dist=old, policy_state=jnp.broadcast_to(state0[:, None], (n, t, 4)), start=start,
    )  # fmt: skip
    objectives = surrogate_and_kl(ac.distribution, unravel, traj, jnp.zeros((n, t)), config, None)

    def trpo_kl(theta):
        return objectives(theta)[1]

    def by_hand(theta, start=start):
        return _sequence_kl_by_hand(ac.policy_net, unravel(theta), old.logits, state0, obs, start)

    @jax.jit
    def fvp_columns(theta):
        return trpo_kl(theta), jax.vmap(fisher_vector_product(trpo_kl, theta, 0.0))(jnp.eye(theta.size)).T

    # One compiled program per side: the episode starts are an argument of the by-hand Hessian.
    by_hand_kl, dense_hessian = jax.jit(by_hand), jax.jit(jax.hessian(by_hand))
    v = jax.random.normal(jax.random.key(4), theta_old.shape)
    for theta in (theta_old, theta_old + 0.05 * v):
        kl_trpo, columns = fvp_columns(theta)
        dense = dense_hessian(theta, start)
        np.testing.assert_allclose(columns, dense, rtol=1e-3, atol=1e-5 * np.abs(dense).max())
    # The KLs agree away from theta_old; at theta_old both are 0 (to float32 rounding of ~1e-8).
    np.testing.assert_allclose(kl_trpo, by_hand_kl(theta, start), rtol=1e-5, atol=1e-8)
    assert float(kl_trpo) > 1e-4
    assert abs(float(fvp_columns(theta_old)[0])) < 1e-7 and abs(float(by_hand_kl(theta_old, start))) < 1e-7
    # The recurrence matters: with the state cut at every step the Hessian is another matrix.
    at_old = dense_hessian(theta_old, start)
    cut = dense_hessian(theta_old, jnp.ones((n, t), bool))
    assert np.abs(cut - at_old).max() > 1e-2 * np.abs(at_old).max()


def test_trpo_update_on_a_recurrent_rollout_checks_the_sequence_kl():
    """Through the real update: the accepted step's KL (what the line search checked against
    max_kl) is the KL of the unrolled new policy to the behaviour one, recomputed here."""
    from kl_rl.agents.base import UpdateContext
    from kl_rl.agents.trpo import TRPOConfig

    _, _, state, _, traj = _rollout("gru")
    max_kl = 0.01
    config = TRPOConfig(total_steps=128, num_envs=4, num_steps=32, network="gru", max_kl=max_kl, vf_epochs=1)
    space = envs.make("CartPole-v1")
    agent = ALGOS["trpo"].make(config, space.observation_space, space.action_space)
    assert agent.initial_state is not None  # the collector carries its state
    agent_state = agent.init(jax.random.key(0)).replace(params=state.agent.params)
    new_state, metrics = jax.jit(agent.update)(jax.random.key(2), agent_state, traj, UpdateContext(jnp.float32(0.0)))
    assert float(metrics["accepted"]) == 1.0
    _, _, env_major, _, ac = _trpo_objectives(traj, state.agent.params, config)
    new_dist = ac.distribution(new_state.params["policy"], env_major)
    recomputed = float(jnp.mean(kl.kl_old_new(env_major.dist, new_dist)))
    assert 0.0 < float(metrics["kl"]) <= max_kl
    np.testing.assert_allclose(float(metrics["kl"]), recomputed, rtol=1e-4)
    # The step is one of the largest the KL allows (KL grows ~ quadratically in the step, so the
    # accepted candidate's KL is within backtrack_coeff^2 of max_kl or it is the first one).
    assert float(metrics["kl"]) > 0.1 * max_kl


@pytest.mark.slow
def test_a_recurrent_trpo_run_trains_and_evaluates():
    config = ALGOS["trpo"].config(total_steps=2 * 4 * 16, num_envs=4, num_steps=16, network="lstm", eval_episodes=2,
                                  vf_epochs=1, vf_minibatches=2)  # fmt: skip
    out = jax.jit(train.make_train("trpo", config, envs.make("CartPoleNoVel-v1")))(jax.random.key(0))
    m = out.metrics
    assert m["kl"].shape == (2,) and np.all(np.asarray(m["kl"]) <= config.max_kl)
    assert np.all(np.isfinite(np.asarray(m["cg_residual"]))) and np.asarray(m["accepted"]).sum() >= 1
    assert out.eval_returns.shape == (2,) and np.all(np.asarray(out.eval_returns) >= 1)


def test_a_stateless_policy_carries_nothing():
    config = PPOConfig(total_steps=32, num_envs=4, num_steps=8)
    trainer = train.make_trainer("ppo", config, envs.make("CartPole-v1"))
    state = jax.eval_shape(trainer.init, jax.random.key(0))
    assert state.collector.policy is None
    assert state.buffer.data.policy_state is None and state.buffer.data.start is None


@pytest.mark.parametrize("algo", ["cem", "vmpo", "mpo"])
def test_algorithms_that_do_not_unroll_refuse_a_recurrent_network(algo):
    config = ALGOS[algo].config(network="gru")
    with pytest.raises(ConfigError, match="needs an update that unrolls a recurrent policy") as excinfo:
        config.validate(envs.make("CartPole-v1").action_space)
    assert "\n" not in str(excinfo.value) and "network" in excinfo.value.fields


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(network="rnn"), "unknown {network} 'rnn'"),
        (dict(network="gru", num_envs=4, num_minibatches=8, num_steps=8), "must divide {num_envs} 4"),
        (dict(network="gru", policy_lag=1), "learns from fresh rollouts only"),
        (dict(network="lstm", replay_rollouts=2), "learns from fresh rollouts only"),
    ],
)
def test_ppo_refuses_recurrent_configs_it_cannot_run(changes, message):
    with pytest.raises(ConfigError) as excinfo:
        PPOConfig(**changes).validate(envs.make("CartPole-v1").action_space)
    assert message in excinfo.value.template


def test_a_recurrent_ppo_run_trains_and_evaluates_with_its_state():
    config = PPOConfig(total_steps=4 * 16, num_envs=4, num_steps=16, num_minibatches=2, network="gru",
                       eval_episodes=2, update_epochs=1)  # fmt: skip
    out = jax.jit(train.make_train("ppo", config, envs.make("CartPoleNoVel-v1")))(jax.random.key(0))
    assert out.metrics["kl"].shape == (1,) and np.all(np.isfinite(np.asarray(out.metrics["kl"])))
    assert out.eval_returns.shape == (2,) and np.all(np.asarray(out.eval_returns) >= 1)


def test_unroll_resets_before_the_step_whose_start_is_set():
    """networks.unroll, by hand: a GRU's outputs along one sequence equal step-by-step applies
    with the state zeroed at the flagged step."""
    import gymnasium as gym

    net = networks.make_policy(gym.spaces.Discrete(2), (8,), "tanh", network="gru")
    params = net.init(jax.random.key(0), jnp.zeros((1, 3)))
    obs = jax.random.normal(jax.random.key(1), (1, 5, 3))
    start = jnp.array([[False, False, True, False, False]])
    state0 = jax.random.normal(jax.random.key(2), (1, 8))
    out = networks.unroll(net, params, state0, obs, start)
    s, expected = state0, []
    for t in range(5):
        if t == 2:
            s = jnp.zeros_like(s)
        dist, s = net.apply(params, obs[:, t], s)
        expected.append(dist.logits)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(jnp.stack(expected, 1)), atol=1e-6)


@pytest.mark.parametrize("network", ["gru", pytest.param("lstm", marks=pytest.mark.slow)])
def test_recurrent_multi_seed_program_has_no_lapack_call(network):
    # As tests/agents/test_ppo.py's check for the MLP: flax's orthogonal init of the cells'
    # recurrent kernels would call LAPACK's QR, which can deadlock under vmap on 2 cores.
    config = PPOConfig(total_steps=64, num_envs=2, num_steps=32, num_minibatches=2, network=network)
    fn = train.make_train("ppo", config, envs.make("CartPoleNoVel-v1"))
    keys = jax.vmap(jax.random.key)(jnp.arange(2))
    text = jax.jit(jax.vmap(fn)).lower(keys).as_text().lower()
    assert "lapack" not in text and "geqrf" not in text


# rl-baselines3-zoo's CartPole PPO settings (the ppo/CartPole-v1 preset); see docs/sections/rnn.md.
SLOW_CONFIG = dict(num_envs=8, num_steps=32, num_minibatches=1, update_epochs=20, gamma=0.98, gae_lambda=0.8,
                   lr=1e-3, ent_coef=0.0)  # fmt: skip
# At 20k steps the 16-seed runs of docs/sections/rnn.md had median training returns of 112 (GRU)
# and 42 (MLP, whose median stayed within 40-49 from there to 100k steps).
SLOW_STEPS, SLOW_SEEDS = 20_000, 4
SLOW_GRU_AT_LEAST, SLOW_MLP_AT_MOST = 80.0, 60.0


@pytest.mark.slow
def test_recurrent_ppo_beats_mlp_ppo_on_cartpole_without_velocities():
    """The memory the carried state gives: with the velocities hidden, a GRU policy can recover
    them from consecutive positions, an MLP cannot (docs/sections/rnn.md has the 16-seed table)."""
    config = PPOConfig(total_steps=SLOW_STEPS, **SLOW_CONFIG)
    keys = jax.vmap(jax.random.key)(jnp.arange(SLOW_SEEDS))
    returns = {}
    for network in ("gru", "mlp"):
        fn = train.make_train("ppo", config.replace(network=network), envs.make("CartPoleNoVel-v1"))
        returns[network] = np.asarray(jax.jit(jax.vmap(fn))(keys).eval_returns).mean(axis=1)
    # Seen once: GRU [198.6, 98.8, 354.3, 90.6], MLP [46.8, 43.1, 45.0, 45.9].
    assert np.median(returns["gru"]) >= SLOW_GRU_AT_LEAST, returns
    assert np.median(returns["mlp"]) <= SLOW_MLP_AT_MOST, returns
