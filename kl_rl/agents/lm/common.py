"""What the token-task agents share: the batch of responses, the token networks, the loss's
regularizers and the update every algorithm runs (their configs' shared fields: `config`).

An algorithm is an `estimate` (what it learns from, per response: advantages, returns, rewards)
and a `loss` over a minibatch of whole groups; `sequence_agent` does the rest once: it collects
each env's first response, runs the minibatch epochs, and logs the metrics every algorithm logs.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp
import optax

from kl_rl import buffer, kl, networks
from kl_rl.agents.base import Agent, UpdateContext
from kl_rl.agents.common import adam, apply_step, kl_controller, minibatch_epochs
from kl_rl.agents.lm.config import ClippedConfig, OnlineConfig, SequenceConfig
from kl_rl.agents.lm.losses import clipped_token_loss, masked_mean
from kl_rl.distributions import Categorical
from kl_rl.envs.tasks import is_token_space
from kl_rl.errors import ConfigError


@flax.struct.dataclass
class LMState:
    """params: {"policy": ..., "value": ... (ppo-lm only)}; the optimizer; the previous-iterate
    penalty's controller."""

    params: dict
    opt_state: optax.OptState
    kl_ctrl: kl.KLControllerState
    stopped: Any = None
    """SFT with stop_at_accuracy: bool, training has stopped (the policy is frozen); else None."""


class Responses(NamedTuple):
    """A batch of responses, one per env, leading axis N (from a [T, N] episodic trajectory).

    tokens: [N, P + H] the prompt and the response (PAD after EOS); action, mask: [N, H] the
    response tokens (0 past the response) and 1.0 where a token was generated; reward: [N, H] the
    rewards the agent learns from (with any KL penalty the collector put in them); log_prob, dist:
    the behaviour policy's; ref_dist: the reference's at each token, or None; value: [N, H] the
    behaviour critic's."""

    tokens: jax.Array
    action: jax.Array
    mask: jax.Array
    reward: jax.Array
    log_prob: jax.Array
    dist: Any
    ref_dist: Any
    value: jax.Array


def response_tokens(traj: buffer.Transition, prompt_length: int, pad: int) -> tuple[jax.Array, jax.Array]:
    """([T, N] mask of each env's first episode, [N, P + T] its prompt and response, PAD after EOS)
    of an episodic [T, N] trajectory: the buffers a causal pass scores whole."""
    valid = buffer.in_first_episode(traj)
    response = jnp.where(valid, traj.action, pad).T.astype(traj.obs.dtype)
    return valid, jnp.concatenate([traj.obs[0, :, :prompt_length], response], axis=-1)


def responses(traj: buffer.Transition, prompt_length: int, pad: int) -> Responses:
    """Each env's first response in a [T, N] trajectory, as [N, ...] arrays."""
    valid, tokens = response_tokens(traj, prompt_length, pad)
    mask = valid.astype(jnp.float32).T
    # Past the response, `action` holds token 0, which every policy can emit (PAD it cannot), so
    # log-probs there stay finite; the mask drops them.
    action = jnp.where(valid, traj.action, 0).T

    def per_env(x):
        return None if x is None else jnp.swapaxes(x, 0, 1)

    return Responses(
        tokens=tokens,
        action=action,
        mask=mask,
        reward=jnp.where(valid, traj.reward, 0.0).T,
        log_prob=jnp.where(valid, traj.log_prob, 0.0).T,
        dist=jax.tree.map(per_env, traj.dist),
        ref_dist=None if traj.ref_dist is None else jax.tree.map(per_env, traj.ref_dist),
        value=jnp.where(valid, traj.value, 0.0).T,
    )


class TokenNetworks(NamedTuple):
    """A token task's policy and critic transformers (`networks.make_token_networks`), and where
    a response sits in their token buffer [P + H]: prompt_length P, horizon H, the PAD id.
    `sampler`: the policy as a stateful sampler carrying a KV cache (`networks.kv_sampler`:
    its initial_state and step), or None to sample with `policy.apply`."""

    policy: networks.Network
    value: networks.Network
    obs_shape: tuple[int, ...]
    prompt_length: int
    horizon: int
    pad: int
    sampler: tuple[Callable, Callable] | None = None

    def response_dist(self, params: dict, tokens: jax.Array) -> Categorical:
        """The policy's distribution at each response position [n, H, V], in one causal pass over
        tokens [n, P + H]."""
        logits = self.policy.sequence(params["policy"], tokens).logits
        return Categorical(logits=logits[:, self.prompt_length - 1 : self.prompt_length - 1 + self.horizon])

    def response_values(self, params: dict, tokens: jax.Array) -> jax.Array:
        """The critic's value before each response token [n, H], in one causal pass."""
        values = self.value.sequence(params["value"], tokens)
        return values[:, self.prompt_length - 1 : self.prompt_length - 1 + self.horizon]


def token_networks(algo: str, config: SequenceConfig, observation_space: gym.Space,
                   action_space: gym.Space) -> TokenNetworks:  # fmt: skip
    """The transformers of config's shape for a token task's spaces; ConfigError for any other env."""
    if not is_token_space(observation_space):
        raise ConfigError(f"{{algo}} {algo} trains on token tasks only (kl-rl list shows them)", "algo")
    policy, value = networks.make_token_networks(observation_space, action_space, config.layers, config.width,
                                                 config.heads)  # fmt: skip
    task = observation_space.task
    sampler = None
    if getattr(config, "kv_cache", False):
        sampler = networks.kv_sampler(observation_space, action_space, config.layers, config.width, config.heads)
    return TokenNetworks(policy, value, observation_space.shape, task.prompt_length, task.response_length,
                         observation_space.pad, sampler)  # fmt: skip


def policy_gradient_loss(nets: TokenNetworks, config: ClippedConfig, params: dict, b: Responses,
                         advantages: jax.Array) -> tuple[Categorical, jax.Array, dict[str, jax.Array]]:  # fmt: skip
    """(the policy's response distributions, the clipped token surrogate at `advantages` [n, H]
    with the ratio to the behaviour policy, {"pg_loss", "clip_frac"})."""
    dist = nets.response_dist(params, b.tokens)
    loss, clip_frac = clipped_token_loss(dist.log_prob(b.action) - b.log_prob, advantages, b.mask, config.clip_eps,
                                         config.clip_eps_high, config.loss_norm)  # fmt: skip
    return dist, loss, {"pg_loss": loss, "clip_frac": clip_frac}


def regularized(loss: jax.Array, config: OnlineConfig, dist: Categorical, b: Responses, beta: jax.Array) -> jax.Array:
    """`loss` with the regularizers every online algorithm has, averaged like the policy loss
    (config.loss_norm): the entropy bonus, and the previous-iterate penalty
    beta * KL(pi_old || pi) per token (config.kl_penalty)."""
    loss = loss - config.ent_coef * masked_mean(dist.entropy(), b.mask, config.loss_norm)
    if config.kl_penalty != "none":
        loss = loss + beta * masked_mean(kl.kl_old_new(b.dist, dist), b.mask, config.loss_norm)
    return loss


def reference_loss(config: ClippedConfig, dist: Categorical, b: Responses, ref_beta: jax.Array | None) -> Any:
    """ref_beta x the reference penalty's per-token term, averaged like the policy loss, when the
    penalty goes in the loss (config.ref_kl_in): `kl.anchor_penalty(pi, pi_ref, token,
    config.ref_kl_estimator, config.ref_kl_direction)`, exact or estimated at the sampled token.
    0.0 when it goes in the reward or the run has no reference (ref_beta None)."""
    if b.ref_dist is None or ref_beta is None or config.ref_kl_in != "loss":
        return 0.0
    penalty = kl.anchor_penalty(dist, b.ref_dist, b.action, config.ref_kl_estimator, config.ref_kl_direction)
    return ref_beta * masked_mean(penalty, b.mask, config.loss_norm)


Estimate = Callable[[Responses], tuple[Any, dict[str, jax.Array]]]
"""estimate(batch) -> (targets, metrics): what the loss learns from, a pytree of per-response
[N, ...] arrays (or None), and metrics of the batch."""
Loss = Callable[[dict, Responses, Any, tuple], tuple[jax.Array, dict[str, jax.Array]]]
"""loss(params, minibatch, its targets, (beta, ref_beta)) -> (loss, aux metrics)."""


def sequence_agent(config: SequenceConfig, nets: TokenNetworks, estimate: Estimate, loss: Loss,
                   controller: kl.KLController, *, group_size: int = 1, critic: bool = False,
                   act: Callable | None = None) -> Agent:  # fmt: skip
    """A token-task agent: an algorithm's `estimate` and `loss` in the update they share.

    The update takes each env's first response (`responses`), estimates its targets, and runs
    config.update_epochs passes of config.num_minibatches minibatches of whole groups of
    `group_size` responses (a group's baseline and pair stay together), Adam at config.lr.

    Args:
      controller: the previous-iterate penalty's beta (its state is `LMState.kl_ctrl`).
      group_size: responses per prompt (static).
      critic: whether the agent has a critic transformer (params["value"]).
      act: act(key, state, obs) of a behaviour policy other than the agent's own (SFT's oracle);
        None samples the policy. The `kl` metric, the exact KL(pi_old || pi) per token, is
        logged when the policy is its own behaviour policy (pi_old the previous iterate).

    With `nets.sampler` (config.kv_cache) the agent samples its own policy through a KV cache:
    its `initial_state` is the empty cache, the collector carries it, and `act` and `policy`
    take and return it (`kl_rl.agents.base.Agent`). `policy(state, obs)` without a cache is the
    same distribution from the whole buffer, for callers that hold no cache (the reference).

    Metrics: `reward` (the verifier's, before any KL penalty in the reward), `response_length`,
    `entropy` (per token), `beta`; `kl_ref` (exact per-token KL(pi || pi_ref) of the updated
    policy, summed over each response, averaged over responses; `kl_ref_forward` too with
    ref_kl_direction forward) with a reference; the mean of each minibatch's loss and aux.
    """
    optimizer = adam(config.max_grad_norm)

    def init(key: jax.Array) -> LMState:
        policy_key, value_key = jax.random.split(key)
        obs = jnp.zeros((1, *nets.obs_shape), jnp.float32)
        params = {"policy": nets.policy.init(policy_key, obs)}
        if critic:
            params["value"] = nets.value.init(value_key, obs)
        return LMState(params=params, opt_state=optimizer.init(params), kl_ctrl=controller.init())

    cached = act is None and nets.sampler is not None

    def policy(state: LMState, obs: jax.Array, policy_state: Any = None) -> Any:
        if policy_state is None:
            return nets.policy.apply(state.params["policy"], obs)
        return nets.sampler[1](state.params["policy"], obs, policy_state)

    def sample(key: jax.Array, state: LMState, obs: jax.Array):
        dist = policy(state, obs)
        action = dist.sample(key)
        return action, dist.log_prob(action), dist

    def cached_sample(key: jax.Array, state: LMState, obs: jax.Array, cache: networks.KVCache):
        dist, cache = policy(state, obs, cache)
        action = dist.sample(key)
        return action, dist.log_prob(action), dist, cache

    def value(state: LMState, obs: jax.Array) -> jax.Array:
        if critic:
            return nets.value.apply(state.params["value"], obs)
        return jnp.zeros(obs.shape[:-1], jnp.float32)

    def score_responses(state: LMState, tokens: jax.Array) -> Categorical:
        return nets.response_dist(state.params, tokens)

    def update(key: jax.Array, state: LMState, traj: buffer.Transition, ctx: UpdateContext):
        ref_beta = ctx.ref_beta
        b = responses(traj, nets.prompt_length, nets.pad)
        raw = b.reward
        if ref_beta is not None and b.ref_dist is not None and config.ref_kl_in == "reward":
            # What the collector subtracted, added back for the `reward` metric.
            pen = kl.anchor_penalty(b.dist, b.ref_dist, b.action, config.ref_kl_estimator, config.ref_kl_direction)
            raw = raw + ref_beta * jnp.where(b.mask > 0, pen, 0.0)
        targets, metrics = estimate(b)

        def per_group(x):
            return x.reshape(x.shape[0] // group_size, group_size, *x.shape[1:])

        def flat(x):
            return x.reshape(-1, *x.shape[2:])

        betas = (state.kl_ctrl.beta, ref_beta)

        def minibatch_step(carry, minibatch):
            params, opt_state = carry
            mb, mb_targets = jax.tree.map(flat, minibatch)
            (mb_loss, aux), grads = jax.value_and_grad(loss, has_aux=True)(params, mb, mb_targets, betas)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (apply_step(params, updates, config.lr), opt_state), {"loss": mb_loss, **aux}

        (params, opt_state), aux = minibatch_epochs(
            key, minibatch_step, (state.params, state.opt_state), jax.tree.map(per_group, (b, targets)),
            config.update_epochs, config.num_minibatches,
        )  # fmt: skip
        new_dist = nets.response_dist(params, b.tokens)
        kl_prev = masked_mean(kl.kl_old_new(b.dist, new_dist), b.mask, "token")
        metrics = {**{k: jnp.mean(v) for k, v in aux.items()}, **metrics}
        metrics.update(
            reward=jnp.mean(jnp.sum(raw, -1)),
            response_length=jnp.mean(jnp.sum(b.mask, -1)),
            entropy=masked_mean(new_dist.entropy(), b.mask, "token"),
            beta=state.kl_ctrl.beta,
        )
        if act is None:
            metrics["kl"] = kl_prev
        if b.ref_dist is not None:
            per_token = jnp.where(b.mask > 0, kl.anchor_kl(new_dist, b.ref_dist, "reverse"), 0.0)
            metrics["kl_ref"] = jnp.mean(jnp.sum(per_token, -1))
            if config.ref_kl_direction == "forward":
                forward = jnp.where(b.mask > 0, kl.anchor_kl(new_dist, b.ref_dist, "forward"), 0.0)
                metrics["kl_ref_forward"] = jnp.mean(jnp.sum(forward, -1))
        kl_ctrl = controller.update(state.kl_ctrl, kl_prev, jnp.sum(b.mask))
        return LMState(params=params, opt_state=opt_state, kl_ctrl=kl_ctrl), metrics

    return Agent(init=init, act=act or (cached_sample if cached else sample), value=value, policy=policy,
                 update=update, episodic=True, score_responses=score_responses,
                 initial_state=nets.sampler[0] if cached else None)  # fmt: skip


def outcome_agent(algo: str, config: ClippedConfig, observation_space: gym.Space, action_space: gym.Space,
                  advantages: Callable[[jax.Array], jax.Array]) -> Agent:  # fmt: skip
    """A clipped policy-gradient agent on outcome advantages (GRPO, RLOO): `advantages` maps the
    [N] responses' summed rewards (in groups of config.group_size) to [N] advantages, each
    applied at every token of its response."""
    nets = token_networks(algo, config, observation_space, action_space)

    def estimate(b):
        return advantages(jnp.sum(b.reward, -1))[:, None] * b.mask, {}

    def loss(params, b, adv, betas):
        dist, pg_loss, aux = policy_gradient_loss(nets, config, params, b, adv)
        return regularized(pg_loss, config, dist, b, betas[0]) + reference_loss(config, dist, b, betas[1]), aux

    return sequence_agent(config, nets, estimate, loss, kl_controller(config), group_size=config.group_size)
