"""The fields the token-task agents' configs share, in three layers: every agent's
(`SequenceConfig`, SFT's whole config), the online algorithms' (`OnlineConfig`: GRPO, RLOO,
PPO-LM, DPO) and the clipped-ratio algorithms' (`ClippedConfig`: GRPO, RLOO, PPO-LM). Each
algorithm's module declares the rest, so a config's fields are the ones its algorithm uses.
"""

from typing import ClassVar

import flax.struct
import gymnasium as gym

from kl_rl.agents.base import RolloutSpec
from kl_rl.agents.common import (
    KL_PENALTIES,
    changed_reference_options,
    check_divides,
    check_positive,
    check_reference,
)
from kl_rl.agents.lm.losses import LOSS_NORMS
from kl_rl.config import static
from kl_rl.envs.tasks import TaskParams
from kl_rl.errors import ConfigError


@flax.struct.dataclass
class SequenceConfig:
    """What every token-task agent declares (SFT's whole config). A rollout is one response per
    env, the task's response length, so a batch is num_envs responses."""

    total_steps: int = static(25_600)
    """Responses to generate over the run; each update generates num_envs of them. (env_steps
    in metrics.csv counts token positions: num_envs x response length per update.)"""
    num_envs: int = static(256)
    """Responses per update (num_envs / group_size prompts, group_size responses each)."""
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
    lr: float = 3e-4
    """Adam learning rate (constant)."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    eval_every: int = static(0)
    """Updates between held-out evaluations logged as eval_return (greedy accuracy); 0: only
    the final one."""
    eval_episodes: int = static(512)
    """Held-out problems in the final evaluation (final_return is their greedy accuracy)."""
    eval_deterministic: bool = static(True)
    """Evaluate with the policy's greedy token (its mode) instead of sampling."""

    # What the training loop and the run folders read of every config, fixed on a token task.
    num_steps: ClassVar[int] = 0
    """0: every rollout runs the task's response length."""
    normalize_obs: ClassVar[bool] = False
    """Observations are tokens."""
    normalize_reward: ClassVar[bool] = False
    """The verifier's rewards are learned from as they are."""
    replay_rollouts: ClassVar[int] = 1
    """Every update learns from the responses it has just generated..."""
    policy_lag: ClassVar[int] = 0
    """...with the current parameters."""
    activation: ClassVar[str] = "gelu"
    """The transformer's MLP activation."""
    distribution: ClassVar[str] = "categorical"
    """The policy's distribution: over the next token."""

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        """The residual stream's width in each block (what --init-from compares of two networks)."""
        return (self.width,) * self.layers

    @property
    def batch_size(self) -> int:
        """Responses per update."""
        return self.num_envs

    @property
    def rollout(self) -> RolloutSpec:
        """One response per env (a rollout is one time limit long, num_steps 0), the task's
        format reward, held-out evaluation points."""
        task = TaskParams(format_reward=self.format_reward)
        return RolloutSpec(num_envs=self.num_envs, num_steps=0, eval_episodes=self.eval_episodes, task_params=task,
                           eval_every=self.eval_every)  # fmt: skip

    @property
    def num_updates(self) -> int:
        return self.total_steps // self.batch_size

    def validate(self, action_space: gym.Space) -> None:
        """Raises ConfigError on values no run could use."""
        self._check_batch(prompts=self.num_envs)

    def _check_batch(self, prompts: int) -> None:
        """Checks the run's and the batch's sizes, with `prompts` groups in a batch."""
        check_positive(self, ("eval_episodes", "total_steps", "num_envs", "update_epochs", "num_minibatches"),
                       ("lr", "max_grad_norm"))  # fmt: skip
        if self.total_steps < self.num_envs:
            raise ConfigError(
                f"{{total_steps}} {self.total_steps} responses is less than one batch of {{num_envs}} {self.num_envs}",
                "total_steps",
                "num_envs",
            )
        check_divides("num_minibatches", self.num_minibatches, prompts)
        if self.eval_every < 0:
            raise ConfigError(f"{{eval_every}} must be >= 0 updates, got {self.eval_every}", "eval_every")


@flax.struct.dataclass
class OnlineConfig(SequenceConfig):
    """What the algorithms that learn from their own responses, held near a frozen reference
    policy (an SFT run, --reference), share: GRPO, RLOO, PPO-LM and online DPO."""

    group_size: int = static(1)
    """G, responses per prompt."""
    init_from_reference: bool = static(True)
    """Start the policy from the reference's parameters (--reference RUN_DIR), as RLHF starts
    from its SFT model; the critic starts fresh."""
    format_reward: float = static(0.0)
    """Reward the task adds at EOS to any well-formed response (digits, then EOS), right or
    wrong, in training only: evaluation scores exact answers."""
    env_params: dict[str, float] = flax.struct.field(default_factory=dict)
    """Overrides of the task's own parameters, by name (format_reward). Traced, so a sweep or vmap
    can vary them. On the CLI: --env.NAME VALUE; in --grid: env.NAME=V1,V2."""
    ref_kl_coef: float = 0.0
    """beta of the KL to the reference; the initial value when a controller drives it. kl_ref is
    logged even at 0."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient (per token)."""
    loss_norm: str = static("sequence")
    """How token losses average: sequence (mean over each response's tokens, then over
    responses: GRPO), token (over all tokens of the batch: DAPO) or constant (sum over tokens /
    (responses x response length): Dr. GRPO)."""
    kl_penalty: str = static("none")
    """A penalty beta * KL(pi_old || pi) per token toward the previous iterate (Kimi k1.5's
    anchor): none, fixed (beta = kl_coef), adaptive (the PPO paper's halve/double rule) or
    proportional (Ziegler et al. 2019)."""
    kl_coef: float = 0.0
    """Initial beta of the previous-iterate penalty (with kl_penalty != none)."""
    kl_penalty_target: float = 0.01
    """KL the adaptive and proportional controllers steer beta towards."""
    kl_horizon: float = 10_000.0
    """Horizon of the proportional controller (Ziegler et al. 2019), in tokens."""
    kv_cache: bool = static(True)
    """Sample through a KV cache carried as the policy's state (the default): each step embeds
    only the new token and attends to the cached keys and values (`kl_rl.networks.kv_sampler`);
    False recomputes the whole buffer at every token. Both give the same distributions to float
    rounding; the update scores whole responses in one causal pass either way. At Addition-v0's
    preset the cache samples 3.4x faster at one seed and GRPO's 8-seed run takes 0.75x the wall
    time (docs/benchmarks.md, "The KV cache")."""

    @property
    def rollout(self) -> RolloutSpec:
        """A sequence config's rollouts, in groups of G responses per prompt, with env params."""
        spec = super().rollout
        return spec._replace(group_size=self.group_size, env_params=True, init_from_reference=self.init_from_reference)

    def validate(self, action_space: gym.Space) -> None:
        check_positive(self, ("group_size",))
        check_divides("group_size", self.group_size, self.num_envs)
        self._check_batch(prompts=self.num_envs // self.group_size)
        if self.loss_norm not in LOSS_NORMS:
            raise ConfigError(
                f"unknown {{loss_norm}} {self.loss_norm!r}; use one of {', '.join(LOSS_NORMS)}", "loss_norm"
            )
        if self.kl_penalty not in KL_PENALTIES:
            raise ConfigError(
                f"unknown {{kl_penalty}} {self.kl_penalty!r}; use one of {', '.join(KL_PENALTIES)}", "kl_penalty"
            )


@flax.struct.dataclass
class ClippedConfig(OnlineConfig):
    """What the clipped-ratio policy-gradient algorithms share (GRPO, RLOO, PPO-LM): the clip,
    and where and how the KL to the reference is taken."""

    clip_eps: float = 0.2
    """Clip range of the probability ratio (lower side; and upper unless clip_eps_high)."""
    clip_eps_high: float = 0.0
    """Upper clip range (DAPO's clip-higher); 0 uses clip_eps."""
    ref_kl_control: str = static("fixed")
    """What drives the reference penalty's beta: fixed, adaptive (halve/double around
    ref_kl_target, PPO paper sec. 4) or proportional (Ziegler et al. 2019)."""
    ref_kl_target: float = 0.05
    """KL to the reference that the adaptive and proportional controllers steer towards."""
    ref_kl_horizon: float = 10_000.0
    """Horizon of the proportional controller of the reference penalty, in token positions
    (num_envs x response length per update)."""
    ref_kl_in: str = static("loss")
    """Where the reference penalty goes: loss (beta x the per-token term, averaged like the
    policy loss) or reward (r_t - beta x the estimate at each token, as in TRL)."""
    ref_kl_estimator: str = static("exact")
    """exact (the per-token KL in closed form) or a one-sample estimate at the sampled token
    (Schulman 2020), l = log pi - log pi_ref: k1 = l, k2 = l^2/2, k3 = exp(-l) - 1 + l, abs = |l|.
    Expected gradients in the loss: k1 zero, k2 grad KL(pi || pi_ref), k3 grad KL(pi_ref || pi)
    (forward); k1 in the reward: grad KL(pi || pi_ref) (kl_rl.kl.anchor_kl_estimate)."""
    ref_kl_direction: str = static("reverse")
    """reverse: KL(pi || pi_ref), mode-seeking (RLHF); forward: KL(pi_ref || pi),
    mass-covering."""

    def validate(self, action_space: gym.Space) -> None:
        super().validate(action_space)
        if float(self.clip_eps) < 0 or float(self.clip_eps_high) < 0:
            raise ConfigError("{clip_eps} and {clip_eps_high} must be >= 0", "clip_eps", "clip_eps_high")
        check_reference(self)

    def uses_reference_options(self) -> list[str]:
        """The reference flags set away from their defaults (they need --reference)."""
        return changed_reference_options(self)
