"""The shape every agent takes: a factory returning pure functions, like optax's transformations."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from kl_rl.buffer import Transition


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
        `Transition` with leaves [T, N, ...]; `ctx` an `UpdateContext` (training progress, the
        reference penalty's coefficient); metrics is a dict of scalars.
      episodic: if True, every rollout starts from freshly reset envs (CEM scores each
        population member on whole episodes); otherwise episodes run on across rollouts.
      score_responses: token-task agents only: score_responses(state, tokens [N, P + H]) ->
        the policy's distribution at each response position [N, H, ...], in one causal pass
        (what `policy` gives at each step of generating the response); None otherwise.
    """

    init: Callable[[jax.Array], Any]
    act: Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, jax.Array, Any]]
    value: Callable[[Any, jax.Array], jax.Array]
    policy: Callable[[Any, jax.Array], Any]
    update: Callable[[jax.Array, Any, Transition, "UpdateContext"], tuple[Any, dict[str, jax.Array]]]
    episodic: bool = False
    score_responses: Callable[[Any, jax.Array], Any] | None = None
