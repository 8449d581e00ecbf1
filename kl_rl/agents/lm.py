"""Language-model post-training in miniature, on verifiable token tasks (`kl_rl.envs.tasks`).

Each algorithm is an `Agent` on the one training loop. Its rollouts are episodic: every rollout
resets all envs, runs the task's response length, and learns from each env's first episode
(one response per env; the steps after an env's EOS are masked out). The policy is a tiny causal
transformer (`kl_rl.networks.TokenTransformer`); the update scores each whole response in one
pass over its token buffer, which by causality gives the same per-token distributions the
sampler used.

- `sft`: next-token cross-entropy on the task's oracle answers (teacher forcing: the oracle is
  the behaviour policy, so its dist in the buffer is a point mass). Its run folder is the
  reference (and the starting point) of the others.
- `grpo` (Shao et al. 2024): `group_size` G responses per prompt, advantages
  (r - mean_group) / std_group on every token, the clipped ratio with `update_epochs` (mu)
  passes, and KL to the reference in the loss with k3 (DeepSeek-R1). Dr. GRPO (Liu et al. 2025):
  `scale_rewards=False` and `loss_norm=constant`. DAPO's clip-higher (Yu et al. 2025):
  `clip_eps_high` > `clip_eps`; DAPO's token-level mean is `loss_norm=token`.
- `rloo` (Ahmadian et al. 2024): the leave-one-out baseline r_i - mean_{j != i} r_j, with the KL
  to the reference in the reward (k1, TRL's default), summed over the response.
- `ppo-lm`: PPO with a per-token KL penalty in the reward (Ziegler et al. 2019; TRL's PPO) and a
  transformer critic: GAE over the response's tokens, clipped value loss. TRL's penalty modes are
  `--ref-kl-estimator`: kl = k1, abs = abs, mse = k2, full = exact; and k3.
- `dpo`: online DPO / IPO (Guo et al. 2024; Calandriello et al. 2024): in each group, the best and
  the worst response by the verifier's reward form a pair (none where they tie), and the loss is
  `kl.preference_loss` on beta log(pi / pi_ref), beta = ref_kl_coef.

KL everywhere goes through `kl_rl.kl` and the reference anchor of `kl_rl.train`:
- in the loss, the per-token term `kl.anchor_penalty(pi, pi_ref, token, estimator, direction)`,
  averaged like the policy loss. Its expected gradient, with the sampled tokens held fixed:
  k1: zero; k2: grad KL(pi || pi_ref); k3 (GRPO's): grad KL(pi_ref || pi), the forward direction;
  exact: grad KL(pi || pi_ref). (tests/test_kl.py and tests/test_lm.py check these by summing over
  a small vocabulary.)
- in the reward, r_t - beta * estimate at each token (the collector's `reward_penalty`): through
  the score function k1 gives grad KL(pi || pi_ref).
- the previous iterate (Kimi k1.5's anchor): `--kl-penalty fixed|adaptive|proportional`, beta *
  exact KL(pi_old || pi) per token in the loss.

Metrics: `reward` (the verifier's, before any KL penalty), `kl_ref` (exact per-token
KL(pi || pi_ref) of the updated policy, summed over the response, averaged over responses),
`response_length`, `entropy` (per token), `kl` (exact KL(pi_old || pi) per token).
"""

from typing import Any, NamedTuple

import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp
import optax

from kl_rl import buffer, kl, networks
from kl_rl.agents.base import Agent
from kl_rl.agents.common import (
    PenalizedConfig,
    adam,
    apply_step,
    check_divides,
    explained_variance,
    kl_controller,
    minibatch_epochs,
    value_loss,
)
from kl_rl.config import static
from kl_rl.distributions import Categorical, categorical
from kl_rl.envs.tasks import is_token_space
from kl_rl.errors import ConfigError
from kl_rl.returns import token_gae

LOSS_NORMS = ("sequence", "token", "constant")


@flax.struct.dataclass
class SequenceConfig(PenalizedConfig):
    """What the token-task agents share. A rollout is one response per env (num_steps is the
    task's response length), so a batch is num_envs responses."""

    total_steps: int = static(25_600)
    """Responses to generate over the run; each update generates num_envs of them. (env_steps
    in metrics.csv counts token positions: num_envs x response length per update.)"""
    num_envs: int = static(256)
    """Responses per update: num_envs / group_size prompts, group_size responses each."""
    num_steps: int = static(0)
    """Must stay 0: every rollout runs the task's response length."""
    group_size: int = static(1)
    """G, responses per prompt (GRPO, RLOO, online DPO)."""
    layers: int = static(2)
    """Transformer blocks."""
    width: int = static(64)
    """Transformer width (embedding and residual stream)."""
    heads: int = static(4)
    """Attention heads (divide width)."""
    update_epochs: int = static(1)
    """Passes over each batch (GRPO's mu)."""
    num_minibatches: int = static(1)
    """Minibatches per pass; must divide the prompts (groups) of a batch."""
    format_reward: float = static(0.0)
    """Reward the task adds at EOS to any well-formed response (digits, then EOS), right or
    wrong, in training only: evaluation scores exact answers."""
    eval_every: int = static(0)
    """Updates between held-out evaluations logged as eval_return (greedy accuracy); 0: only
    the final one."""
    init_from_reference: bool = static(True)
    """Start the policy from the reference's parameters (--reference RUN_DIR), as RLHF starts
    from its SFT model; the critic starts fresh."""
    eval_episodes: int = static(512)
    """Held-out problems in the final evaluation (final_return is their greedy accuracy)."""
    gamma: float = 1.0
    """Discount over the response's tokens (ppo-lm)."""
    lr: float = 3e-4
    """Adam learning rate (constant)."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    clip_eps: float = 0.2
    """Clip range of the probability ratio (lower side; and upper unless clip_eps_high)."""
    clip_eps_high: float = 0.0
    """Upper clip range (DAPO's clip-higher); 0 uses clip_eps."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient (per token)."""
    loss_norm: str = static("sequence")
    """How token losses average: sequence (mean over each response's tokens, then over
    responses: GRPO), token (over all tokens of the batch: DAPO) or constant (sum over tokens /
    (responses x response length): Dr. GRPO)."""
    scale_rewards: bool = static(True)
    """Divide group-centred rewards by the group's std (GRPO); False is Dr. GRPO's."""

    @property
    def batch_size(self) -> int:
        """Responses per update."""
        return self.num_envs

    def validate(self, action_space: gym.Space) -> None:
        self._check_on_policy(action_space, ("update_epochs", "num_minibatches", "group_size"),
                              ("lr", "max_grad_norm"))  # fmt: skip
        if self.num_steps != 0:
            raise ConfigError("--num-steps must stay 0 on a token task: a rollout is one whole response per env")
        if self.normalize_obs or self.normalize_reward:
            raise ConfigError("--normalize-obs and --normalize-reward do not apply to token tasks; leave them off")
        if self.stale:
            raise ConfigError("--replay-rollouts and --policy-lag are not supported by the token-task agents")
        check_divides("group_size", self.group_size, self.num_envs)
        check_divides("num_minibatches", self.num_minibatches, self.num_envs // self.group_size)
        if self.loss_norm not in LOSS_NORMS:
            raise ConfigError(f"unknown --loss-norm {self.loss_norm!r}; use one of {', '.join(LOSS_NORMS)}")
        if float(self.clip_eps) < 0 or float(self.clip_eps_high) < 0:
            raise ConfigError("--clip-eps and --clip-eps-high must be >= 0")
        if self.eval_every < 0:
            raise ConfigError(f"--eval-every must be >= 0 updates, got {self.eval_every}")

    def _check_on_policy(self, action_space, positive=(), positive_float=()):
        # num_steps 0 is this family's "one response": check the rest as the base does.
        for name in ("eval_episodes", "total_steps", "num_envs", *positive):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        for name in positive_float:
            if not float(getattr(self, name)) > 0:
                value = float(getattr(self, name))
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
        if not 0.0 <= float(self.gamma) <= 1.0 or not 0.0 <= float(self.gae_lambda) <= 1.0:
            raise ConfigError("--gamma and --gae-lambda must lie in [0, 1]")
        if self.total_steps < self.num_envs:
            raise ConfigError(
                f"--total-steps {self.total_steps} responses is less than one batch of --num-envs {self.num_envs}"
            )
        if self.kl_penalty not in ("none", "fixed", "adaptive", "proportional"):
            raise ConfigError(f"unknown --kl-penalty {self.kl_penalty!r}; use none, fixed, adaptive or proportional")
        self._check_reference()


@flax.struct.dataclass
class SFTConfig(SequenceConfig):
    """Supervised fine-tuning on the task's oracle answers."""

    lr: float = 1e-3
    """Adam learning rate (constant)."""


@flax.struct.dataclass
class GRPOConfig(SequenceConfig):
    """GRPO: G samples per prompt, group-normalized advantages, k3 to the reference in the loss."""

    group_size: int = static(8)
    """G, responses per prompt."""
    ref_kl_coef: float = 0.04
    """beta of the KL to the reference (DeepSeekMath's 0.04)."""
    ref_kl_estimator: str = static("k3")
    """k3 in the loss, as GRPO (its expected gradient is the forward KL's; see the module doc)."""


@flax.struct.dataclass
class RLOOConfig(SequenceConfig):
    """RLOO: G samples per prompt, leave-one-out baseline, KL to the reference in the reward."""

    group_size: int = static(4)
    """G, responses per prompt (RLOO's k)."""
    ref_kl_coef: float = 0.05
    """beta of the per-token KL penalty in the reward."""
    ref_kl_in: str = static("reward")
    """The penalty goes in the reward (summed over the response), as in TRL's RLOO."""
    ref_kl_estimator: str = static("k1")
    """k1 in the reward: through the score function, the gradient of KL(pi || pi_ref)."""


@flax.struct.dataclass
class PPOLMConfig(SequenceConfig):
    """PPO with a per-token KL penalty in the reward and a transformer critic (TRL's PPO)."""

    update_epochs: int = static(4)
    """PPO epochs over each batch (TRL's 4)."""
    num_minibatches: int = static(4)
    """Minibatches per epoch."""
    ref_kl_coef: float = 0.05
    """beta of the per-token KL penalty in the reward."""
    ref_kl_in: str = static("reward")
    """Per-token penalty in the reward (TRL)."""
    ref_kl_estimator: str = static("k1")
    """TRL's modes: k1 (kl), abs, k2 (mse), exact (full); or k3."""
    gae_lambda: float = 0.95
    """GAE lambda over the response's tokens."""
    vf_coef: float = 0.1
    """Value loss coefficient (TRL's 0.1)."""
    clip_value: bool = static(True)
    """Clip the value update to +/- clip_eps around the behaviour value (TRL's cliprange_value)."""


@flax.struct.dataclass
class DPOConfig(SequenceConfig):
    """Online DPO / IPO: pairs of the policy's own responses, ranked by the verifier."""

    group_size: int = static(2)
    """Responses per prompt; the best and the worst form the pair."""
    ref_kl_coef: float = 0.1
    """DPO's beta: the implicit reward is beta log(pi / pi_ref)."""
    dpo_loss: str = static("sigmoid")
    """sigmoid (DPO) or ipo (IPO)."""

    def validate(self, action_space: gym.Space) -> None:
        super().validate(action_space)
        if self.group_size < 2:
            raise ConfigError(f"--group-size must be >= 2 for online DPO (a pair per prompt), got {self.group_size}")
        if self.dpo_loss not in kl.PREFERENCE_LOSSES:
            raise ConfigError(f"unknown --dpo-loss {self.dpo_loss!r}; use one of {', '.join(kl.PREFERENCE_LOSSES)}")
        if not float(self.ref_kl_coef) > 0:
            raise ConfigError("--ref-kl-coef is DPO's beta and must be > 0")
        if self.ref_kl_in != "loss" or self.ref_kl_control != "fixed":
            raise ConfigError("online DPO's beta sits in its loss: use --ref-kl-in loss and --ref-kl-control fixed")


@flax.struct.dataclass
class LMState:
    """params: {"policy": ..., "value": ... (ppo-lm only)}; the optimizer; the previous-iterate
    penalty's controller."""

    params: dict
    opt_state: optax.OptState
    kl_ctrl: kl.KLControllerState


class Responses(NamedTuple):
    """A batch of responses, one per env, leading axis N (from a [T, N] episodic trajectory).

    tokens: [N, P + H] the prompt and the response (PAD after EOS); action, mask: [N, H] the
    response tokens (0 past the response) and 1.0 where a token was generated; reward: [N, H] the rewards the agent
    learns from (with any KL penalty the collector put in them); log_prob, dist: the behaviour
    policy's; ref_dist: the reference's at each token, or None; value: [N, H] the behaviour
    critic's."""

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


def masked_mean(x: jax.Array, mask: jax.Array, norm: str) -> jax.Array:
    """The mean of per-token x [n, H] over the mask, by `loss_norm` (see SequenceConfig)."""
    x = jnp.where(mask > 0, x, 0.0)
    if norm == "sequence":
        return jnp.mean(jnp.sum(x * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0))
    if norm == "token":
        return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return jnp.sum(x * mask) / mask.size


def group_advantages(reward: jax.Array, group_size: int, kind: str, scale: bool) -> jax.Array:
    """Per-response advantages [N] from rewards [N] in consecutive groups of G.

    kind "group": r - mean of the group, divided by the group's std (+1e-4) when `scale` (GRPO);
    "loo": r_i - mean of the other G - 1 rewards (RLOO).
    """
    r = reward.reshape(-1, group_size)
    if kind == "loo":
        baseline = (jnp.sum(r, -1, keepdims=True) - r) / max(group_size - 1, 1)
        return (r - baseline).reshape(-1)
    adv = r - jnp.mean(r, -1, keepdims=True)
    if scale:
        adv = adv / (jnp.std(r, -1, keepdims=True) + 1e-4)
    return adv.reshape(-1)


def _reference_term(config, beta, dist, ref_dist, action, mask):
    """beta x the per-token reference term in the loss, averaged like the policy loss."""
    if ref_dist is None or beta is None or config.ref_kl_in != "loss":
        return 0.0
    term = kl.anchor_penalty(dist, ref_dist, action, config.ref_kl_estimator, config.ref_kl_direction)
    return beta * masked_mean(term, mask, config.loss_norm)


def sequence_agent(kind: str):
    """The factory of one token-task algorithm: "sft", "grpo", "rloo", "ppo-lm" or "dpo"."""

    def make(config: SequenceConfig, observation_space: gym.Space, action_space: gym.Space) -> Agent:
        if not is_token_space(observation_space):
            raise ConfigError(f"--algo {kind} trains on token tasks only (kl-rl list shows them)")
        policy_net, value_net = networks.make_token_networks(
            observation_space, action_space, config.layers, config.width, config.heads
        )
        task = observation_space.task
        prompt_length, horizon, pad = task.prompt_length, task.response_length, observation_space.pad
        optimizer = adam(config.max_grad_norm)
        controller = kl_controller(config)
        critic = kind == "ppo-lm"

        def init(key: jax.Array) -> LMState:
            policy_key, value_key = jax.random.split(key)
            obs = jnp.zeros((1, *observation_space.shape), jnp.float32)
            params = {"policy": policy_net.init(policy_key, obs)}
            if critic:
                params["value"] = value_net.init(value_key, obs)
            return LMState(params=params, opt_state=optimizer.init(params), kl_ctrl=controller.init())

        def policy(state: LMState, obs: jax.Array) -> Categorical:
            return policy_net.apply(state.params["policy"], obs)

        def act(key: jax.Array, state: LMState, obs: jax.Array):
            if kind == "sft":
                # Teacher forcing: the oracle acts, and its distribution is a point mass.
                action = task.oracle_action(obs)
                dist = categorical(jnp.zeros((*obs.shape[:-1], action_space.n)),
                                      jax.nn.one_hot(action, action_space.n) > 0)  # fmt: skip
                return action, jnp.zeros(action.shape, jnp.float32), dist
            dist = policy(state, obs)
            action = dist.sample(key)
            return action, dist.log_prob(action), dist

        def value(state: LMState, obs: jax.Array) -> jax.Array:
            if critic:
                return value_net.apply(state.params["value"], obs)
            return jnp.zeros(obs.shape[:-1], jnp.float32)

        def response_dist(params, tokens):
            """The policy's distribution at each response position [n, H, V], in one pass."""
            logits = policy_net.sequence(params["policy"], tokens).logits
            return Categorical(logits=logits[:, prompt_length - 1 : prompt_length - 1 + horizon])

        def score_responses(state: LMState, tokens: jax.Array) -> Categorical:
            return response_dist(state.params, tokens)

        def response_values(params, tokens):
            return value_net.sequence(params["value"], tokens)[:, prompt_length - 1 : prompt_length - 1 + horizon]

        def loss_fn(params, batch, betas):
            beta, ref_beta = betas
            b, adv, returns = batch
            dist = response_dist(params, b.tokens)
            log_prob = dist.log_prob(b.action)
            entropy = dist.entropy()
            aux = {}
            if kind == "sft":
                loss = masked_mean(-log_prob, b.mask, "token")
                correct = (jnp.argmax(dist.logits, -1) == b.action) | (b.mask == 0)
                aux = {"nll": loss, "token_accuracy": masked_mean(correct.astype(jnp.float32), b.mask, "token"),
                       "sequence_accuracy": jnp.mean(jnp.all(correct, -1).astype(jnp.float32))}  # fmt: skip
                return loss, aux
            if kind == "dpo":
                ref_log_prob = b.ref_dist.log_prob(b.action)
                per_token = jnp.where(b.mask > 0, log_prob - ref_log_prob, 0.0)
                log_ratio = jnp.sum(per_token, -1).reshape(-1, config.group_size)
                chosen_i, rejected_i, has_pair = adv  # per group
                chosen = jnp.take_along_axis(log_ratio, chosen_i[:, None], -1)[:, 0]
                rejected = jnp.take_along_axis(log_ratio, rejected_i[:, None], -1)[:, 0]
                pair_loss = kl.preference_loss(chosen, rejected, ref_beta, config.dpo_loss)
                pairs = jnp.sum(has_pair)
                loss = jnp.sum(jnp.where(has_pair, pair_loss, 0.0)) / jnp.maximum(pairs, 1.0)
                mean = lambda x: jnp.sum(jnp.where(has_pair, x, 0.0)) / jnp.maximum(pairs, 1.0)  # noqa: E731
                aux = {"reward_chosen": mean(ref_beta * chosen), "reward_rejected": mean(ref_beta * rejected),
                       "reward_margin": mean(ref_beta * (chosen - rejected)),
                       "pair_frac": pairs / has_pair.size}  # fmt: skip
            else:
                log_ratio = log_prob - b.log_prob
                ratio = jnp.exp(log_ratio)
                high = jnp.where(config.clip_eps_high > 0, config.clip_eps_high, config.clip_eps)
                clipped = jnp.clip(ratio, 1.0 - config.clip_eps, 1.0 + high)
                objective = jnp.minimum(ratio * adv, clipped * adv)
                loss = -masked_mean(objective, b.mask, config.loss_norm)
                clip_frac = masked_mean(((ratio < 1 - config.clip_eps) | (ratio > 1 + high)).astype(jnp.float32),
                                        b.mask, "token")  # fmt: skip
                aux = {"pg_loss": loss, "clip_frac": clip_frac}
                if critic:
                    v = response_values(params, b.tokens)
                    m = b.mask.astype(bool)
                    vf = value_loss(jnp.where(m, v, 0.0), b.value, jnp.where(m, returns, 0.0), config.clip_eps,
                                    config.clip_value) * b.mask.size / jnp.maximum(jnp.sum(b.mask), 1.0)  # fmt: skip
                    loss = loss + config.vf_coef * vf
                    aux["vf_loss"] = vf
            loss = loss - config.ent_coef * masked_mean(entropy, b.mask, config.loss_norm)
            if config.kl_penalty != "none":
                loss = loss + beta * masked_mean(kl.kl_old_new(b.dist, dist), b.mask, config.loss_norm)
            if kind != "dpo":
                loss = loss + _reference_term(config, ref_beta, dist, b.ref_dist, b.action, b.mask)
            return loss, aux

        def update(key: jax.Array, state: LMState, traj: buffer.Transition, progress: jax.Array, ref_beta=None):
            del progress
            b = responses(traj, prompt_length, pad)
            n, g = b.mask.shape[0], config.group_size
            raw = b.reward
            if ref_beta is not None and b.ref_dist is not None and config.ref_kl_in == "reward":
                # What the collector subtracted, added back for the `reward` metric.
                pen = kl.anchor_penalty(b.dist, b.ref_dist, b.action, config.ref_kl_estimator, config.ref_kl_direction)
                raw = raw + ref_beta * jnp.where(b.mask > 0, pen, 0.0)
            seq_reward = jnp.sum(b.reward, -1)
            returns = jnp.zeros_like(b.reward)
            if kind == "sft":
                adv = jnp.zeros_like(b.reward)
            elif kind == "dpo":
                r = seq_reward.reshape(-1, g)
                adv = (jnp.argmax(r, -1), jnp.argmin(r, -1), jnp.max(r, -1) > jnp.min(r, -1))
            elif kind == "ppo-lm":
                time_major = token_gae(b.reward.T, b.value.T, b.mask.T, config.gamma, config.gae_lambda)
                adv, returns = (x.T for x in time_major)
                if config.normalize_advantages:
                    mean = masked_mean(adv, b.mask, "token")
                    std = jnp.sqrt(masked_mean(jnp.square(adv - mean), b.mask, "token"))
                    adv = (adv - mean) / (std + 1e-8) * b.mask
            else:
                seq_adv = group_advantages(seq_reward, g, "loo" if kind == "rloo" else "group", config.scale_rewards)
                adv = seq_adv[:, None] * b.mask
            # Minibatches of whole groups: a group's pair (DPO) and baseline stay together.
            def per_group(x):
                return x.reshape(n // g, g, *x.shape[1:])

            def flat(x):
                return x.reshape(-1, *x.shape[2:])

            grouped = (jax.tree.map(per_group, b), adv if kind == "dpo" else per_group(adv), per_group(returns))
            betas = (state.kl_ctrl.beta, ref_beta)

            def minibatch_step(carry, minibatch):
                params, opt_state = carry
                mb_b, mb_adv, mb_ret = minibatch
                mb = (jax.tree.map(flat, mb_b), mb_adv if kind == "dpo" else flat(mb_adv), flat(mb_ret))
                (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb, betas)
                updates, opt_state = optimizer.update(grads, opt_state, params)
                return (apply_step(params, updates, config.lr), opt_state), {"loss": loss, **aux}

            (params, opt_state), aux = minibatch_epochs(
                key, minibatch_step, (state.params, state.opt_state), grouped, config.update_epochs,
                config.num_minibatches,
            )  # fmt: skip
            new_dist = response_dist(params, b.tokens)
            kl_prev = masked_mean(kl.kl_old_new(b.dist, new_dist), b.mask, "token")
            metrics = {k: jnp.mean(v) for k, v in aux.items()}
            metrics.update(
                reward=jnp.mean(jnp.sum(raw, -1)),
                response_length=jnp.mean(jnp.sum(b.mask, -1)),
                entropy=masked_mean(new_dist.entropy(), b.mask, "token"),
                beta=state.kl_ctrl.beta,
            )
            if kind != "sft":
                metrics["kl"] = kl_prev
            if critic:
                metrics["explained_variance"] = explained_variance(returns * b.mask, b.value * b.mask)
            if b.ref_dist is not None:
                per_token = jnp.where(b.mask > 0, kl.anchor_kl(new_dist, b.ref_dist, "reverse"), 0.0)
                metrics["kl_ref"] = jnp.mean(jnp.sum(per_token, -1))
                if config.ref_kl_direction == "forward":
                    forward = jnp.where(b.mask > 0, kl.anchor_kl(new_dist, b.ref_dist, "forward"), 0.0)
                    metrics["kl_ref_forward"] = jnp.mean(jnp.sum(forward, -1))
            kl_ctrl = controller.update(state.kl_ctrl, kl_prev, jnp.sum(b.mask))
            return LMState(params=params, opt_state=opt_state, kl_ctrl=kl_ctrl), metrics

        return Agent(init=init, act=act, value=value, policy=policy, update=update, episodic=True,
                     score_responses=score_responses)  # fmt: skip

    return make


sft = sequence_agent("sft")
grpo = sequence_agent("grpo")
rloo = sequence_agent("rloo")
ppo_lm = sequence_agent("ppo-lm")
dpo = sequence_agent("dpo")
