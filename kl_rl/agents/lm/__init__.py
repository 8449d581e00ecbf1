"""Language-model post-training in miniature, on verifiable token tasks (`kl_rl.envs.tasks`).

Each algorithm is an `Agent` on the one training loop, in a module of its own: its Config and
its factory. Their rollouts are episodic: every rollout resets all envs, runs the task's response
length, and learns from each env's first episode (one response per env; the steps after an env's
EOS are masked out). The policy is a tiny causal transformer (`kl_rl.networks.TokenTransformer`);
the update scores each whole response in one pass over its token buffer, which by causality gives
the same per-token distributions the sampler used.

- `sft`: next-token cross-entropy on the task's oracle answers (teacher forcing). Its run folder
  is the reference (and the starting point) of the others.
- `grpo` (Shao et al. 2024): group-normalized advantages, the clipped ratio, k3 to the reference
  in the loss; Dr. GRPO and DAPO's clip-higher by flags.
- `rloo` (Ahmadian et al. 2024): the leave-one-out baseline, k1 to the reference in the reward.
- `ppo_lm` (Ziegler et al. 2019; TRL's PPO): a per-token KL penalty in the reward, a transformer
  critic, GAE over the response's tokens.
- `dpo`: online DPO / IPO (Guo et al. 2024; Calandriello et al. 2024) on the best and the worst
  response of each group, beta = ref_kl_coef.

`common` holds what they share (the batch of responses, the update skeleton `sequence_agent`),
`config` their configs' shared fields, `losses` their losses and advantages as pure functions.

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

from kl_rl.agents.lm.common import LMState, Responses, response_tokens, responses
from kl_rl.agents.lm.config import ClippedConfig, OnlineConfig, SequenceConfig
from kl_rl.agents.lm.dpo import DPOConfig, dpo
from kl_rl.agents.lm.grpo import GRPOConfig, grpo
from kl_rl.agents.lm.ppo_lm import PPOLMConfig, ppo_lm
from kl_rl.agents.lm.rloo import RLOOConfig, rloo
from kl_rl.agents.lm.sft import SFTConfig, sft

__all__ = [
    "ClippedConfig",
    "DPOConfig",
    "GRPOConfig",
    "LMState",
    "OnlineConfig",
    "PPOLMConfig",
    "RLOOConfig",
    "Responses",
    "SFTConfig",
    "SequenceConfig",
    "dpo",
    "grpo",
    "ppo_lm",
    "response_tokens",
    "responses",
    "rloo",
    "sft",
]
