"""The frozen-reference anchor: a finished run's policy that a KL penalty pulls toward.

Kickstarting (Schmitt et al. 2018) and RLHF's penalty (Ziegler et al. 2019; Ouyang et al. 2022)
hold the policy near a fixed reference pi_ref. The loop (`kl_rl.train`) composes this module:

- while collecting, `behaviour` gives the reference's distribution at each step (recorded as
  `Transition.ref_dist`) and, with `ref_kl_in="reward"`, the reward penalty
  beta * estimate(pi, pi_ref) subtracted from each reward (`kl.anchor_penalty`);
- a token task's reference scores each whole response in one causal pass instead (`score`);
- after the agent's update, `after_update` measures `kl_ref`, the exact mean KL(pi || pi_ref)
  of the updated policy over the batch (reverse direction; `kl_ref_forward` for the forward
  one), steps the penalty's KL controller on the direction the config penalizes, and logs
  `ref_beta`, the coefficient this update used.

The reference's parameters are data (`Reference`, given to `init` in its `Setup`), its network
static (`RefSpec`): one compiled program serves every reference of the same network.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp

from kl_rl import buffer, kl, networks, normalize, rollout
from kl_rl.agents import ALGOS
from kl_rl.agents.common import ref_kl_controller
from kl_rl.agents.lm import response_tokens


class RefSpec(NamedTuple):
    """What builds a frozen reference policy's network: the algo and config of the run it comes
    from (static; its parameters are data, in `Reference`)."""

    algo: str
    config: Any


@flax.struct.dataclass
class Reference:
    """One item's frozen reference policy: a finished run's agent state for one of its seeds,
    and the observation normalizer it was trained with."""

    agent: Any
    obs_norm: normalize.RunningMeanStd


Penalty = Callable[[Any, jax.Array, Any], jax.Array]
"""penalty(dist, action, ref_dist) -> [N]: the per-step KL penalty subtracted from the reward."""


class RefAnchor(NamedTuple):
    """The reference anchor's pure functions, for one reference network and one env's spaces."""

    init: Callable[[Reference | None, jax.Array, Any], tuple[Reference, kl.KLControllerState]]
    """init(reference, key, config) -> (the reference, its controller's state); a None reference
    gives zeros of its shapes (a template for checkpoints; a run is given its reference)."""
    behaviour: Callable[[Reference, kl.KLControllerState, Any], tuple[Callable, Penalty | None]]
    """behaviour(reference, ctrl, config) -> (raw obs -> pi_ref's distribution, the reward penalty
    or None); with `initial_state`, (raw obs, ref state) -> (pi_ref's distribution, ref state)."""
    score: Callable[[Reference, buffer.Transition, Penalty | None], buffer.Transition] | None
    """Token tasks: the trajectory with `ref_dist` from one causal pass per response and the
    penalty subtracted from its rewards; None where the reference scores each step."""
    after_update: Callable[..., tuple[kl.KLControllerState, dict[str, jax.Array]]]
    """after_update(ctrl, config, agent, agent_state, data, metrics) -> (ctrl, metrics with
    kl_ref, ref_beta and, when the penalty is forward, kl_ref_forward)."""
    initial_state: Callable[[int], Any] | None = None
    """A recurrent reference's initial_state(n) -> its state for n envs, which the collector
    carries beside the policy's (`rollout.CollectorState.reference`); None for a stateless one
    and for a token reference, which scores whole responses."""


def anchor(spec: RefSpec, observation_space: gym.Space, action_space: gym.Space) -> RefAnchor:
    """The reference anchor of a reference network `spec` acting in these spaces."""
    ref_agent = ALGOS[spec.algo].make(spec.config, observation_space, action_space)

    def init(reference: Reference | None, key: jax.Array, config: Any):
        if reference is None:
            # Shapes only (templates of checkpoints); a run is given its reference.
            ref_agent_state = jax.eval_shape(ref_agent.init, key)
            reference = Reference(
                jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), ref_agent_state),
                normalize.init(observation_space.shape),
            )
        return reference, ref_kl_controller(config).init()

    def behaviour(reference: Reference, ctrl: kl.KLControllerState, config: Any):
        def ref_fn(raw_obs, *ref_state):
            """raw obs [, ref state] -> the reference's distribution [and next state], through its
            own observation normalizer."""
            obs = rollout.observe(reference.obs_norm, raw_obs, spec.config.normalize_obs)
            return ref_agent.policy(reference.agent, obs, *ref_state)

        penalty = None
        if config.ref_kl_in == "reward":
            beta = ctrl.beta

            def penalty(dist, action, ref_dist):
                term = kl.anchor_penalty(dist, ref_dist, action, config.ref_kl_estimator, config.ref_kl_direction)
                return beta * term

        return ref_fn, penalty

    def score(reference: Reference, trajectory: buffer.Transition, penalty: Penalty | None) -> buffer.Transition:
        """A token task's [T, N] trajectory with the reference's distribution at each step of
        each env's first response (`ref_dist`), and the reward penalty (if any) subtracted there.
        Steps after an env's first response (which episodic agents mask out) get no penalty."""
        valid, tokens = response_tokens(trajectory, observation_space.prompt_length, observation_space.pad)
        steps = valid.shape[0]  # the response length, or fewer (init's shape probe)
        pad = ((0, 0), (0, observation_space.response_length - steps))
        tokens = jnp.pad(tokens, pad, constant_values=observation_space.pad)
        ref_dist = ref_agent.score_responses(reference.agent, tokens)
        ref_dist = jax.tree.map(lambda x: jnp.swapaxes(x[:, :steps], 0, 1), ref_dist)
        reward = trajectory.reward
        if penalty is not None:
            reward = reward - jnp.where(valid, penalty(trajectory.dist, trajectory.action, ref_dist), 0.0)
        return trajectory._replace(ref_dist=ref_dist, reward=reward)

    def after_update(ctrl, config, agent, agent_state, data, metrics):
        if "kl_ref" in metrics:
            # The agent measured it its own way (token tasks: summed over each response).
            kl_ref = metrics["kl_ref"]
        else:
            kl_ref = jnp.mean(kl.anchor_kl(updated_policy(agent, agent_state, data), data.ref_dist, "reverse"))
        controlled = kl_ref
        if config.ref_kl_direction == "forward":
            if "kl_ref_forward" not in metrics:
                new_dist = updated_policy(agent, agent_state, data)
                metrics["kl_ref_forward"] = jnp.mean(kl.anchor_kl(new_dist, data.ref_dist, "forward"))
            controlled = metrics["kl_ref_forward"]
        new_ctrl = ref_kl_controller(config).update(ctrl, controlled, data.reward.size)
        return new_ctrl, {**metrics, "kl_ref": kl_ref, "ref_beta": ctrl.beta}

    scores = ref_agent.score_responses is not None
    return RefAnchor(
        init=init,
        behaviour=behaviour,
        score=score if scores else None,
        after_update=after_update,
        initial_state=None if scores else ref_agent.initial_state,
    )


def updated_policy(agent: Any, agent_state: Any, data: buffer.Transition) -> Any:
    """The agent's policy at every step of an update's [T, N] data: of each observation, or for a
    stateful policy replayed along the rollout from each env's first recorded state, reset where
    `data.start` says (the distributions the update itself gives)."""
    if data.policy_state is None:
        return agent.policy(agent_state, data.obs)
    first = jax.tree.map(lambda x: x[0], data.policy_state)

    def apply(obs, policy_state):
        return agent.policy(agent_state, obs, policy_state)

    return networks.unroll_steps(apply, agent.initial_state(data.start.shape[1]), first, data.obs, data.start)
