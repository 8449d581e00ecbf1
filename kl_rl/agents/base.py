"""The shape every agent takes: a factory returning pure functions, like optax's transformations."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from kl_rl.buffer import Transition


class RolloutSpec(NamedTuple):
    """What a config asks of the loop's rollouts: static values that `kl_rl.train.make_trainer`
    reads once (every config class declares it as its `rollout` property)."""

    num_envs: int
    """Parallel envs of a rollout."""
    num_steps: int
    """Steps of each env per rollout; 0 for one whole time limit (CEM's episodes, token tasks' responses)."""
    eval_episodes: int
    """Envs (one episode each) of the final evaluation."""
    group_size: int = 1
    """Consecutive envs that share a prompt (token tasks' groups)."""
    normalize_obs: bool = False
    """Observations through a running normalizer kept in the train state."""
    normalize_reward: bool = False
    """Rewards scaled by the running std of the discounted return (with the config's traced gamma)."""
    policy_lag: int = 0
    """The agent state of this many updates ago acts (`kl_rl.staleness`)."""
    replay_rollouts: int = 1
    """Rollouts the update sees (`kl_rl.staleness`)."""
    env_params: bool = False
    """The config carries `env_params`, traced overrides of the env's own parameters."""
    task_params: Any = None
    """A token task's static parameters (`kl_rl.envs.tasks.TaskParams`), or None."""
    init_from_reference: bool = False
    """The policy starts from the frozen reference's parameters (RLHF's start from SFT)."""
    eval_every: int = 0
    """Updates between held-out evaluation points (token tasks); 0: only the final evaluation."""
    replay_capacity: int = 0
    """Off-policy replay: time steps of the vectorized env (items of num_envs transitions) kept
    in the buffer across updates; the loop adds each rollout and hands the agent's update the
    whole `BufferState`, which it samples (`kl_rl.buffer.sample_windows`). 0: the update sees
    the last rollout(s) in order (`kl_rl.staleness`)."""


class UpdateContext(NamedTuple):
    """What the training loop tells an agent's update besides the data (`Agent.update`)."""

    progress: jax.Array
    """The fraction of training done before this update, in [0, 1): what annealing reads."""
    ref_beta: jax.Array | None = None
    """The coefficient of the KL penalty toward the frozen reference this update (its controller
    lives in `kl_rl.reference`), or None when the run has no reference. With ref_kl_in="loss"
    the agent adds ref_beta x its per-step KL term to the loss; with "reward" the collector has
    already subtracted the penalty from the rewards."""


class Agent(NamedTuple):
    """Pure functions over an immutable agent state.

    Attributes:
      init: init(key) -> state.
      act: act(key, state, obs) -> (action, log_prob, dist): the behaviour policy, batched
        over a leading env axis; `dist` is the action distribution it sampled from.
      value: value(state, obs) -> V(obs) of the agent's critic (zeros for critic-free agents),
        batched over any leading axes.
      policy: policy(state, obs) -> dist: the current policy's action distribution.
      update: update(key, state, trajectory, ctx) -> (state, metrics). `trajectory` is a
        `Transition` with leaves [T, N, ...], or with `RolloutSpec.replay_capacity` > 0 the
        replay `BufferState` of such Transitions (the newest rollout included); `ctx` an
        `UpdateContext` (training progress, the reference penalty's coefficient); metrics is a
        dict of scalars.
      episodic: if True, every rollout starts from freshly reset envs (CEM scores each
        population member on whole episodes); otherwise episodes run on across rollouts.
      score_responses: token-task agents only: score_responses(state, tokens [N, P + H]) ->
        the policy's distribution at each response position [N, H, ...], in one causal pass
        (what `policy` gives at each step of generating the response); None otherwise.
      initial_state: a stateful policy's (a recurrent cell's) initial_state(n) -> its state for
        n envs; None for a stateless policy. With one, act(key, state, obs, policy_state) ->
        (action, log_prob, dist, policy_state) and policy(state, obs, policy_state) -> (dist,
        policy_state); the collector carries the state and `update` receives a trajectory with
        `policy_state` and `start` (`kl_rl.rollout`).
    """

    init: Callable[[jax.Array], Any]
    act: Callable[..., tuple]
    value: Callable[[Any, jax.Array], jax.Array]
    policy: Callable[..., Any]
    update: Callable[[jax.Array, Any, Transition, "UpdateContext"], tuple[Any, dict[str, jax.Array]]]
    episodic: bool = False
    score_responses: Callable[[Any, jax.Array], Any] | None = None
    initial_state: Callable[[int], Any] | None = None
