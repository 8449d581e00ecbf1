"""The token-task agents' losses and advantages, as pure functions of arrays.

Shapes: [n, H] per token (n responses of the task's response length H, `mask` 1.0 where a
token was generated), [n] per response, [n / G] per group of G responses to one prompt (groups
are consecutive).
"""

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

LOSS_NORMS = ("sequence", "token", "constant")
PREFERENCE_LOSSES = ("sigmoid", "ipo")


def masked_mean(x: jax.Array, mask: jax.Array, norm: str) -> jax.Array:
    """The mean of per-token x [n, H] over the generated tokens (mask [n, H]).

    norm "sequence": over each response's tokens, then over responses (GRPO); "token": over all
    the batch's tokens (DAPO); "constant": their sum / (n x H) (Dr. GRPO). A response with no
    token counts 0.
    """
    x = jnp.where(mask > 0, x, 0.0)
    if norm == "sequence":
        return jnp.mean(jnp.sum(x * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0))
    if norm == "token":
        return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return jnp.sum(x * mask) / mask.size


def cross_entropy(logits: jax.Array, log_prob: jax.Array, action: jax.Array,
                  mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:  # fmt: skip
    """SFT's next-token cross-entropy -log pi(y_t | y_<t) of the target tokens, averaged over
    all the batch's tokens (teacher forcing: the targets are the oracle's answers).

    Args:
      logits: the policy's logits at each position [n, H, V].
      log_prob: log pi of the target tokens [n, H].
      action: the target tokens [n, H].
      mask: [n, H].

    Returns:
      (loss, {"nll": loss, "token_accuracy", "sequence_accuracy"}): the greedy token's accuracy
      over the target tokens, and the fraction of responses it gets whole.
    """
    loss = masked_mean(-log_prob, mask, "token")
    correct = (jnp.argmax(logits, -1) == action) | (mask == 0)
    return loss, {"nll": loss, "token_accuracy": masked_mean(correct.astype(jnp.float32), mask, "token"),
                  "sequence_accuracy": jnp.mean(jnp.all(correct, -1).astype(jnp.float32))}  # fmt: skip


def clipped_token_loss(log_ratio: jax.Array, advantages: jax.Array, mask: jax.Array, clip_eps: ArrayLike,
                       clip_eps_high: ArrayLike, norm: str) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """PPO's clipped surrogate per token (Schulman et al. 2017, eq. 7), as GRPO applies it.

    -mean over tokens of min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) with r = exp(log_ratio),
    the ratio pi / pi_old of each token to the behaviour policy; eps_high = clip_eps_high when it
    is > 0 (DAPO's clip-higher, Yu et al. 2025), else clip_eps. The mean is `masked_mean`'s
    `norm`.

    Returns:
      (loss, clip_frac): clip_frac is the fraction of tokens whose ratio lies outside the range.
    """
    ratio = jnp.exp(log_ratio)
    high = jnp.where(clip_eps_high > 0, clip_eps_high, clip_eps)
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high)
    objective = jnp.minimum(ratio * advantages, clipped * advantages)
    outside = (ratio < 1 - clip_eps) | (ratio > 1 + high)
    return -masked_mean(objective, mask, norm), masked_mean(outside.astype(jnp.float32), mask, "token")


def preference_loss(log_ratio_chosen: jax.Array, log_ratio_rejected: jax.Array, beta: ArrayLike,
                    kind: str = "sigmoid") -> jax.Array:  # fmt: skip
    """The per-pair loss of DPO (Rafailov et al. 2023) or IPO (Azar et al. 2023).

    The implicit reward of a response y is beta * log(pi(y) / pi_ref(y)): the optimum's reward
    under the reverse-KL penalty beta KL(pi || pi_ref), up to a prompt-only term. With
    h = log_ratio_chosen - log_ratio_rejected (each log pi(y) - log pi_ref(y), summed over the
    response's tokens): "sigmoid" (DPO) is -log sigmoid(beta h); "ipo" is (h - 1 / (2 beta))^2,
    which pulls the margin to a finite target instead of without bound.
    """
    h = log_ratio_chosen - log_ratio_rejected
    if kind == "sigmoid":
        return -jax.nn.log_sigmoid(beta * h)
    if kind == "ipo":
        return jnp.square(h - 1.0 / (2.0 * beta))
    raise ValueError(f"unknown preference loss {kind!r}; use one of {', '.join(PREFERENCE_LOSSES)}")


GROUP_STDS = ("population", "sample")
"""How GRPO's group std is taken: over the G rewards (ddof 0), or TRL's unbiased sample std (ddof 1)."""


def group_advantages(reward: jax.Array, group_size: int, scale: bool = True, std: str = "population") -> jax.Array:
    """GRPO's advantages (Shao et al. 2024): r - mean of the group, over the group's std (+1e-4)
    when `scale`; without, Dr. GRPO's (Liu et al. 2025).

    Args:
      reward: [n] per-response rewards, in consecutive groups of `group_size` (static).
      scale: static.
      std: static, one of GROUP_STDS: "population" divides by sqrt(mean((r - mean)^2)), as
        DeepSeekMath's formula reads; "sample" by the unbiased std (G - 1 in the denominator),
        as TRL's GRPOTrainer does (torch.std). Larger groups make the two agree.

    Returns:
      [n] per-response advantages.
    """
    r = reward.reshape(-1, group_size)
    adv = r - jnp.mean(r, -1, keepdims=True)
    if scale:
        ddof = GROUP_STDS.index(std)
        adv = adv / (jnp.std(r, -1, keepdims=True, ddof=ddof) + 1e-4)
    return adv.reshape(-1)


def leave_one_out_advantages(reward: jax.Array, group_size: int) -> jax.Array:
    """RLOO's advantages (Ahmadian et al. 2024): r_i - mean_{j != i} r_j within each group.

    Args:
      reward: [n] per-response rewards, in consecutive groups of `group_size` (static).

    Returns:
      [n] per-response advantages.
    """
    r = reward.reshape(-1, group_size)
    baseline = (jnp.sum(r, -1, keepdims=True) - r) / max(group_size - 1, 1)
    return (r - baseline).reshape(-1)


def best_and_worst(reward: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Online DPO's pairs: in each group, the index of the best and of the worst response by
    reward, and whether they differ (a group of ties forms no pair).

    Args:
      reward: [n] per-response rewards, in consecutive groups of `group_size` (static).

    Returns:
      (chosen, rejected, has_pair), each [n / group_size].
    """
    r = reward.reshape(-1, group_size)
    return jnp.argmax(r, -1), jnp.argmin(r, -1), jnp.max(r, -1) > jnp.min(r, -1)


def pair_loss(log_ratio: jax.Array, reward: jax.Array, group_size: int, beta: ArrayLike,
              kind: str) -> tuple[jax.Array, dict[str, jax.Array]]:  # fmt: skip
    """Online DPO's loss: `preference_loss` of each group's best against its worst response,
    averaged over the groups that hold a pair (Guo et al. 2024; Calandriello et al. 2024).

    Args:
      log_ratio: [n] log pi(y) - log pi_ref(y) of each response, summed over its tokens.
      reward: [n] the verifier's rewards, in consecutive groups of `group_size` (static).
      beta: DPO's beta.
      kind: "sigmoid" (DPO) or "ipo".

    Returns:
      (loss, aux): the implicit rewards beta log(pi / pi_ref) of the chosen and rejected
      responses and their margin, averaged over pairs, and the fraction of groups with a pair.
    """
    chosen_i, rejected_i, has_pair = best_and_worst(reward, group_size)
    log_ratio = log_ratio.reshape(-1, group_size)
    chosen = jnp.take_along_axis(log_ratio, chosen_i[:, None], -1)[:, 0]
    rejected = jnp.take_along_axis(log_ratio, rejected_i[:, None], -1)[:, 0]
    pairs = jnp.sum(has_pair)

    def over_pairs(x):
        return jnp.sum(jnp.where(has_pair, x, 0.0)) / jnp.maximum(pairs, 1.0)

    aux = {"reward_chosen": over_pairs(beta * chosen), "reward_rejected": over_pairs(beta * rejected),
           "reward_margin": over_pairs(beta * (chosen - rejected)), "pair_frac": pairs / has_pair.size}  # fmt: skip
    return over_pairs(preference_loss(chosen, rejected, beta, kind)), aux
