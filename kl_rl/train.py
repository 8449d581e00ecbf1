"""The one training loop: `make_train(algo, config, env) -> train(key, config)`.

A whole run -- rollouts over the vectorized env, the replay buffer, agent updates and the final
evaluation -- is one pure function of a PRNG key and a config, so it can be jitted into one XLA
program and `vmap`ped over seeds and over configs that differ only in traced hyperparameters
(PureJaxRL's `make_train`, with a typed config instead of a mutable dict).

Every algorithm runs through this loop; an algorithm differs only in its `Agent` (its act and
update functions).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from kl_rl import buffer, envs, kl, normalize, rollout
from kl_rl import reference as reference_lib
from kl_rl.agents import ALGOS
from kl_rl.agents.base import RolloutSpec, UpdateContext
from kl_rl.divergence import nonfinite
from kl_rl.errors import ConfigError
from kl_rl.reference import Reference, RefSpec
from kl_rl.staleness import Staleness


@flax.struct.dataclass
class StartFrom:
    """Parameters a run starts from instead of fresh ones (`--init-from`, fine-tuning): the
    agent's `params` and the observation and reward normalizers of the run they come from."""

    params: Any
    obs_norm: normalize.RunningMeanStd
    reward_norm: normalize.RunningMeanStd


class Setup(NamedTuple):
    """Per-item data that `init` takes besides the key and config (None: nothing)."""

    reference: Reference | None = None
    start: StartFrom | None = None


@flax.struct.dataclass
class Anchors:
    """The policies a run is held near besides the previous iterate, carried between updates.

    Attributes:
      reference: the frozen reference policy, or None.
      ref_ctrl: the reference penalty's KL controller state, or None.
      lagged: a buffer of the agent states of the last `policy_lag` updates; the oldest acts.
        None without policy lag.
    """

    reference: Reference | None
    ref_ctrl: kl.KLControllerState | None
    lagged: buffer.BufferState | None


@flax.struct.dataclass
class TrainState:
    """The full state of a run between two updates; a checkpoint of it resumes exactly."""

    agent: Any
    collector: rollout.CollectorState
    buffer: buffer.BufferState
    key: jax.Array
    update_count: jax.Array
    last_return: jax.Array
    last_length: jax.Array
    anchors: Anchors | None = None
    """Reference policy and policy-lag history; None (no leaves) when a run has neither."""


class TrainOutput(NamedTuple):
    """What `train` returns: the final state, per-update metrics and the final evaluation."""

    state: TrainState
    metrics: dict[str, jax.Array]
    eval_returns: jax.Array


class Trainer(NamedTuple):
    """The pieces of a run, for callers that need more than `train` (checkpointing, eval)."""

    init: Callable[..., TrainState]
    run: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
    evaluate: Callable[..., jax.Array]
    train: Callable[..., TrainOutput]
    steps_per_update: int
    """Env steps one update collects (num_envs x rollout length), for one seed."""
    env_path: str
    """"jax" (the whole run in XLA) or "host" (gymnasium envs stepped by callbacks)."""
    vec_env: Any
    """The training env's copies (a VecEnv or a HostVecEnv)."""
    eval_env: Any
    """The evaluation env's copies."""
    restart_envs: Callable[..., TrainState]
    """restart_envs(key, state) -> state with fresh episodes. A host env's own state is not part
    of a checkpoint, so a resumed host run starts new episodes (normalizers and all else kept)."""
    reference: RefSpec | None = None
    """The frozen reference policy's network, when the run has one."""


class Loop(NamedTuple):
    """What a run's steps close over: fixed by `make_trainer` from the algo, the static config
    fields, the env and the reference network. The steps below are pure functions of it."""

    make_agent: Callable[..., Any]
    spec: RolloutSpec
    """What the config asks of the rollouts (`config.rollout`)."""
    vec_env: Any
    eval_env: Any
    num_updates: int
    rollout_steps: int
    """Steps of each env per rollout (num_steps, or one whole time limit when it is 0)."""
    steps_per_update: int
    """Env steps one update collects (num_envs x rollout_steps)."""
    eval_steps: int
    stale: Staleness
    ref: reference_lib.RefAnchor | None

    def agent(self, config: Any) -> Any:
        """The agent of this config (its traced fields are the config's, so a sweep shares the loop)."""
        return self.make_agent(config, self.vec_env.observation_space, self.vec_env.action_space)

    def envs(self, config: Any) -> tuple[Any, Any]:
        """The training and evaluation envs with `config.env_params` (traced) swapped in."""
        if not (self.spec.env_params and config.env_params):
            return self.vec_env, self.eval_env
        return self.vec_env.with_params(config.env_params), self.eval_env.with_params(config.env_params)


def make_trainer(algo: str, config: Any, env: Any, reference: RefSpec | None = None) -> Trainer:
    """Builds the pure functions of a training run.

    Args:
      algo: a key of `kl_rl.agents.ALGOS`.
      config: the algorithm's config; its static fields fix the program's shapes. The functions
        take a config argument too, which must share these static fields, so traced fields can
        be swept with `vmap`.
      env: what `kl_rl.envs.make` returns: a FuncEnv (the JAX path) or a GymEnv (the host path).
      reference: the network of a frozen reference policy (same env), whose parameters `init`
        takes in its `Setup`; the run then records the reference's distribution at every step
        (`Transition.ref_dist`), penalizes the KL to it (config.ref_kl_*) and logs `kl_ref` and
        `ref_beta` (`kl_rl.reference`).
    """
    spec = config.rollout
    if reference is not None and (getattr(config, "images", False) or getattr(reference.config, "images", False)):
        raise ConfigError("{network} cnn takes no --reference yet, nor is a cnn run one; use {network} mlp",
                          "network")  # fmt: skip
    if getattr(config, "images", False):
        env = envs.with_images(env)
    vec_env = envs.vectorize(env, spec.num_envs, group_size=spec.group_size)
    if spec.task_params is not None:
        vec_env.params = spec.task_params
    eval_env = envs.vectorize(env, spec.eval_episodes, evaluation=True)
    spaces = (vec_env.observation_space, vec_env.action_space)
    ref = None if reference is None else reference_lib.anchor(reference, *spaces)
    stale = Staleness(lag=spec.policy_lag, replay=spec.replay_rollouts)
    loop = Loop(ALGOS[algo].make, spec, vec_env, eval_env, config.num_updates, 0, 0, 0, stale, ref)
    # The evaluation's length: the env's time limit under this config's params (gymnax's
    # max_steps_in_episode is one; a sweep over it evaluates at the first point's limit).
    eval_steps = loop.envs(config)[1].max_episode_steps or 1000
    # num_steps 0 means one whole time limit per rollout (CEM's episodes).
    rollout_steps = spec.num_steps or eval_steps
    loop = loop._replace(rollout_steps=rollout_steps, steps_per_update=spec.num_envs * rollout_steps,
                         eval_steps=eval_steps)  # fmt: skip

    def init(key: jax.Array, config: Any = config, setup: Setup | None = None) -> TrainState:
        return init_state(loop, key, config, setup or Setup())

    def run(state: TrainState, config: Any = config, num_updates: int = loop.num_updates):
        """Runs `num_updates` updates (static) and stacks their metrics.

        A run split into segments of updates (progress, checkpoints) calls this once per segment.
        It holds no host callback, so JAX's persistent cache keeps its compiled program.
        """
        return jax.lax.scan(lambda s, _: update_step(loop, s, config), state, length=num_updates)

    def evaluate(key: jax.Array, state: TrainState, config: Any = config) -> jax.Array:
        return evaluate_policy(loop, key, state, config)

    def train(key: jax.Array, config: Any = config, setup: Setup | None = None) -> TrainOutput:
        init_key, eval_key = jax.random.split(key)
        state = init(init_key, config, setup)
        state, metrics = run(state, config)
        return TrainOutput(state, metrics, evaluate(eval_key, state, config))

    def restart_envs(key: jax.Array, state: TrainState) -> TrainState:
        collector = state.collector
        env_state = loop.envs(config)[0].reset(key, collector.env.env_state)
        collector = collector._replace(env=env_state, discounted_return=jnp.zeros_like(collector.discounted_return))
        if collector.policy is not None:
            collector = collector._replace(policy=rollout.fresh_policy(initial_state(loop, config)))
        return state.replace(collector=fresh_reference(loop, collector))

    return Trainer(init, run, evaluate, train, loop.steps_per_update, envs.path_of(env), vec_env, eval_env,
                   restart_envs, reference)  # fmt: skip


def collect(loop: Loop, key: jax.Array, agent: Any, agent_state: Any, collector: rollout.CollectorState,
            num_steps: int, config: Any, anchors: Anchors | None = None):  # fmt: skip
    """The one collector, acting with `agent_state` as the behaviour policy.

    Takes the config it is given, not make_trainer's: gamma is traced, and a sweep over it
    shares the loop.
    """
    reward_gamma = config.gamma if loop.spec.normalize_reward else None
    ref_fn = penalty = None
    if anchors is not None and anchors.reference is not None:
        ref_fn, penalty = loop.ref.behaviour(anchors.reference, anchors.ref_ctrl, config)
    # A token-task agent scores whole responses and learns from each env's first episode,
    # so its episode statistics count those only (CEM counts every episode that ends).
    whole_responses = agent.score_responses is not None
    scored = ref_fn is not None and loop.ref.score is not None
    initial = initial_state(loop, config, agent)
    if initial is None:

        def act(k, obs):
            return agent.act(k, agent_state, obs)
    else:

        def act(k, obs, policy_state):
            return agent.act(k, agent_state, obs, policy_state)

    # A token-task agent's update reads no policy state (its KV cache is a way to sample, the
    # update scores each response in one pass), so the trajectory does not store it.
    collector, trajectory, episodes = rollout.collect(
        key, act, loop.envs(config)[0], collector, num_steps,
        loop.spec.normalize_obs, lambda obs, *state: agent.value(agent_state, obs, *state), reward_gamma,
        None if scored else ref_fn, None if scored else penalty, first_episode_only=whole_responses,
        initial_state=initial, keep_state=not whole_responses,
        reference_initial_state=reference_state(loop),
    )  # fmt: skip
    if scored:
        # One causal pass per response after the rollout: the distributions a per-step call
        # gives, at 1/H of the work.
        trajectory = loop.ref.score(anchors.reference, trajectory, penalty)
    return collector, trajectory, episodes


def initial_state(loop: Loop, config: Any, agent: Any = None) -> Any:
    """A stateful policy's initial state for the training env's copies; None for a stateless one."""
    agent = loop.agent(config) if agent is None else agent
    return None if agent.initial_state is None else agent.initial_state(loop.spec.num_envs)


def episodic_start(loop: Loop, config: Any, agent: Any, collector: rollout.CollectorState) -> rollout.CollectorState:
    """The collector of an episodic agent's rollout, whose envs were just reset: a stateful
    policy starts every env afresh. Its state lives for the rollout only (the train state keeps
    None, so a run's state has the shape it has without one)."""
    initial = initial_state(loop, config, agent)
    collector = fresh_reference(loop, collector)
    return collector if initial is None else collector._replace(policy=rollout.fresh_policy(initial))


def reference_state(loop: Loop) -> Any:
    """A recurrent reference's initial state for the training env's copies; None for a
    stateless reference or none."""
    if loop.ref is None or loop.ref.initial_state is None:
        return None
    return loop.ref.initial_state(loop.spec.num_envs)


def fresh_reference(loop: Loop, collector: rollout.CollectorState) -> rollout.CollectorState:
    """The collector with a recurrent reference's state back at its start (every env afresh)."""
    return collector if collector.reference is None else collector._replace(reference=reference_state(loop))


def init_state(loop: Loop, key: jax.Array, config: Any, setup: Setup) -> TrainState:
    """A run's first state: the agent (fresh, or from `setup.start`), fresh envs, the anchors' state."""
    agent = loop.agent(config)
    agent_key, env_key, key = jax.random.split(key, 3)
    agent_state = agent.init(agent_key)
    # The config marks every axis the run is vmapped along (seeds, sweep points), which a
    # host env needs to make one copy per element (see HostVecEnv.reset).
    obs_shape = loop.vec_env.observation_space.shape
    collector = rollout.init_collector(loop.envs(config)[0].reset(env_key, config), obs_shape,
                                       None if agent.episodic else initial_state(loop, config, agent),
                                       reference_state(loop))  # fmt: skip
    if setup.start is not None:
        agent_state = agent_state.replace(params=setup.start.params)
        collector = collector._replace(obs_norm=setup.start.obs_norm, reward_norm=setup.start.reward_norm)
    elif loop.spec.init_from_reference and setup.reference is not None:
        # RLHF's start: the policy is the reference (an SFT run); anything else starts fresh.
        params = {**agent_state.params, "policy": setup.reference.agent.params["policy"]}
        agent_state = agent_state.replace(params=params)
    anchors = None
    if loop.ref is not None or loop.stale.lag:
        ref, ctrl = loop.ref.init(setup.reference, agent_key, config) if loop.ref is not None else (None, None)
        anchors = Anchors(reference=ref, ref_ctrl=ctrl, lagged=loop.stale.init_lag(agent_state))
    # The buffer's item is what the collector records for one step: shapes only, nothing runs.
    probe = episodic_start(loop, config, agent, collector) if agent.episodic else collector
    one_step = jax.eval_shape(lambda: collect(loop, key, agent, agent_state, probe, 1, config, anchors)[1])
    example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), one_step)
    capacity = loop.spec.replay_capacity or loop.stale.capacity(loop.rollout_steps)
    return TrainState(
        agent=agent_state,
        collector=collector,
        buffer=buffer.init(capacity, example),
        key=key,
        update_count=jnp.zeros((), jnp.int32),
        last_return=jnp.full((), jnp.nan, jnp.float32),
        last_length=jnp.full((), jnp.nan, jnp.float32),
        anchors=anchors,
    )


def update_step(loop: Loop, state: TrainState, config: Any) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update: collect with the behaviour policy, add to the buffer, update the agent, step the anchors."""
    agent = loop.agent(config)
    key, collect_key, update_key, reset_key = jax.random.split(state.key, 4)
    collector, anchors = state.collector, state.anchors
    if agent.episodic:
        collector = collector._replace(env=loop.envs(config)[0].reset(reset_key, collector.env.env_state))
        collector = episodic_start(loop, config, agent, collector)
    behaviour = loop.stale.behaviour(anchors and anchors.lagged, state.agent)
    collector, trajectory, episodes = collect(loop, collect_key, agent, behaviour, collector, loop.rollout_steps,
                                              config, anchors)  # fmt: skip
    if agent.episodic:
        collector = collector._replace(policy=None)
    if loop.spec.replay_capacity:
        # Off-policy replay: the buffer persists across updates and the agent samples it.
        buf = buffer.add_batch(state.buffer, trajectory)
        data = buf
    else:
        buf = loop.stale.add(state.buffer, trajectory, state.update_count)
        data = buffer.ordered(buf)
    progress = state.update_count.astype(jnp.float32) / loop.num_updates
    ref_beta = None if loop.ref is None else anchors.ref_ctrl.beta
    agent_state, metrics = agent.update(update_key, state.agent, data, UpdateContext(progress, ref_beta))
    if loop.ref is not None:
        # With replay, the reference's KL is measured on the newest rollout.
        ref_data = trajectory if loop.spec.replay_capacity else data
        ctrl, metrics = loop.ref.after_update(anchors.ref_ctrl, config, agent, agent_state, ref_data, metrics)
        anchors = anchors.replace(ref_ctrl=ctrl)
    if loop.stale.lag:
        anchors = anchors.replace(lagged=loop.stale.push(anchors.lagged, state.agent))
    update_count = state.update_count + 1
    last_return, last_length = episode_means(episodes, state.last_return, state.last_length)
    metrics = {
        "env_steps": update_count * loop.steps_per_update,
        "episode_return": last_return,
        "episode_length": last_length,
        "episodes": episodes.count,
        **metrics,
    }
    # Whether this update left the run finite; kl_rl.divergence.first_nonfinite reads it.
    metrics["nonfinite"] = nonfinite(agent_state, metrics)
    new_state = TrainState(agent_state, collector, buf, key, update_count, last_return, last_length, anchors)
    return new_state, metrics


def evaluate_policy(loop: Loop, key: jax.Array, state: TrainState, config: Any) -> jax.Array:
    """Returns of `eval_episodes` episodes of the current policy, one per env."""
    agent = loop.agent(config)
    eval_env = loop.envs(config)[1]
    initial = None if agent.initial_state is None else agent.initial_state(eval_env.num_envs)
    policy = eval_policy(agent, state.agent, config.eval_deterministic)
    return rollout.evaluate(key, policy, eval_env, state.collector.obs_norm, loop.spec.normalize_obs,
                            loop.eval_steps, state.collector.env, initial)  # fmt: skip


def eval_policy(agent: Any, agent_state: Any, deterministic: Any) -> Callable:
    """policy(key, obs) -> action of an evaluation: the distribution's mode, or a sample. For a
    stateful agent (`agent.initial_state`), policy(key, obs, policy_state) -> (action, policy_state)."""

    def choose(k, dist):
        return dist.mode() if deterministic else dist.sample(k)

    if agent.initial_state is None:

        def policy(k, obs):
            return choose(k, agent.policy(agent_state, obs))

        return policy

    def recurrent(k, obs, policy_state):
        dist, policy_state = agent.policy(agent_state, obs, policy_state)
        return choose(k, dist), policy_state

    return recurrent


def episode_means(episodes: rollout.EpisodeStats, last_return: jax.Array, last_length: jax.Array):
    """The mean return and length of the episodes that ended in a rollout; the last ones if none did."""
    ended = episodes.count > 0
    count = jnp.maximum(episodes.count, 1)
    return (jnp.where(ended, episodes.return_sum / count, last_return),
            jnp.where(ended, episodes.length_sum / count, last_length))  # fmt: skip


def vmap_seeds(fn: Callable, in_axes: Any = 0) -> Callable:
    """`jax.vmap(fn, in_axes)` over a leading seed axis, except that a single seed runs unbatched.

    A vmap over an axis of size 1 is not free on CPU: XLA keeps the unit batch dimension on every
    dot, and the weight gradients of the backward pass come out transposed and are copied each
    minibatch step (10-17% of a PPO run at PureJaxRL's config, docs/benchmarks.md). The result
    has the seed axis either way.

    Args:
      fn: the per-seed function.
      in_axes: as `jax.vmap`'s, with every entry 0 (batched over seeds) or None (shared).
    """
    if any(axis not in (0, None) for axis in (in_axes if isinstance(in_axes, tuple | list) else (in_axes,))):
        raise ValueError(f"vmap_seeds maps leading axes only; in_axes entries must be 0 or None, got {in_axes}")
    batched = jax.vmap(fn, in_axes=in_axes)

    def call(*args):
        axes = in_axes if isinstance(in_axes, tuple | list) else (in_axes,) * len(args)
        # Arguments without arrays (a None setup) say nothing of the batch size.
        sizes = [
            jax.tree.leaves(a)[0].shape[0]
            for a, axis in zip(args, axes, strict=True)
            if axis is not None and jax.tree.leaves(a)
        ]
        if any(size != 1 for size in sizes):
            return batched(*args)
        one = [a if axis is None else jax.tree.map(lambda x: x[0], a) for a, axis in zip(args, axes, strict=True)]
        return jax.tree.map(lambda x: x[None], fn(*one))

    return call


def make_train(algo: str, config: Any, env: Any, **kwargs) -> Callable[..., TrainOutput]:
    """`train(key, config=config) -> TrainOutput`, a pure function to jit and vmap.

    Example:
      >>> train = make_train("ppo", PPOConfig(), kl_rl.envs.make("CartPole-v1"))
      >>> out = jax.jit(jax.vmap(train))(jax.random.split(jax.random.key(0), 8))
    """
    return make_trainer(algo, config, env, **kwargs).train
