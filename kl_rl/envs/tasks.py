"""Verifiable token tasks as JAX envs: generating an answer, one token per step, is an episode.

The episode's state is a fixed-length token buffer: the prompt, then the response written so far,
then padding. Reset samples a prompt from the task's training split; an action is one token,
written at the next free position; the episode ends at EOS. A verifier scores the response at
the EOS step: 1 for the exact answer (then EOS), plus an optional `format_reward` for any
well-formed answer (one or more digits, then EOS). Every other step pays 0.

Episode end, precisely:
- EOS ends the episode: `terminated`.
- A response that fills its `response_length` positions without EOS scores 0 and also ends the
  episode as `terminated`: the buffer is full, no action remains, so the state is terminal in
  the MDP's sense and nothing may bootstrap from it. (It is a truncated response in the LM
  sense; `truncated` stays False, so returns are not bootstrapped on a value the critic was
  never trained on.) `VecEnv`'s time limit equals the response length, so it never fires first.

Observations are the token buffer as float32 (kl_rl's envs all give float arrays; token ids are
small integers, exact in float32) in a `TokenSpace`, which says how to read them: vocabulary,
prompt length, response length, the PAD and EOS ids, and the task's oracle for supervised
fine-tuning (`kl-rl train --algo sft`). Prompts hold no padding, so the position of the next
token is the number of non-PAD tokens: a causal transformer reads its logits there.

Held-out split: each task fixes `held_out_size` problems with a seeded NumPy generator (no
download, the same on every machine); training resets never draw them (rejection sampling), and
evaluation (`evaluation=True` in `kl_rl.envs.vectorize`) runs them in order, env i on problem i,
with the format reward off, so an eval return is exact-match accuracy: greedy accuracy when the
policy's mode acts (`eval_deterministic`), and `pass_at_k` from sampled answers.
"""

import math
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from gymnasium import spaces
from gymnasium.experimental.functional import FuncEnv

from kl_rl.envs.vector import VecEnv, VecEnvState

VOCAB: tuple[str, ...] = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "<pad>", "<eos>", "+", "=")
"""The tokens of every task: digit d is token d."""
PAD, EOS, PLUS, EQUALS = 10, 11, 12, 13


class TokenSpace(spaces.Box):
    """A token buffer of `prompt_length + response_length` ids, stored as float32.

    Attributes:
      vocab: the token strings; token i is vocab[i].
      prompt_length: P, the prompt's tokens (no padding).
      response_length: H, the most tokens a response may have (EOS included).
      pad, eos: their ids.
      task: the SequenceTask (its oracle and decoder), for agents that need them (SFT).
    """

    def __init__(self, task: "SequenceTask"):
        self.vocab = VOCAB
        self.prompt_length = task.prompt_length
        self.response_length = task.response_length
        self.pad, self.eos = PAD, EOS
        self.task = task
        length = task.prompt_length + task.response_length
        super().__init__(0.0, float(len(VOCAB) - 1), (length,), np.float32)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def is_token_space(space: Any) -> bool:
    """Whether observations in `space` are token buffers of a sequence task."""
    return isinstance(space, TokenSpace)


@flax.struct.dataclass
class TaskParams:
    """What a task's reward reads.

    Attributes:
      format_reward: added at EOS to a well-formed response (one or more digits, then EOS),
        right or wrong.
    """

    format_reward: float = 0.0


@flax.struct.dataclass
class TaskState:
    """tokens: [P + H] int32 buffer; t: response tokens written so far."""

    tokens: jax.Array
    t: jax.Array


class SequenceTask(FuncEnv):
    """A verifiable task: a prompt sampler, the oracle answer, and exact-match reward.

    Subclasses define the problem space: `num_problems`, `problem_tokens(index) -> prompt` and
    `answer_tokens(prompt) -> [H]` (answer digits, EOS, then PAD).
    """

    id: ClassVar[str]
    prompt_length: ClassVar[int]
    response_length: ClassVar[int]
    num_problems: ClassVar[int]
    held_out_size: ClassVar[int] = 512
    held_out_seed: ClassVar[int] = 20241

    def __init__(self) -> None:
        super().__init__()
        self.observation_space = TokenSpace(self)
        self.action_space = spaces.Discrete(len(VOCAB))
        self.max_episode_steps = self.response_length
        self.default_params = TaskParams()
        rng = np.random.default_rng(self.held_out_seed)
        self.held_out = np.sort(rng.choice(self.num_problems, self.held_out_size, replace=False)).astype(np.int32)

    # -- the problem space ------------------------------------------------------------------
    def problem_tokens(self, index: jax.Array) -> jax.Array:
        """[P] int32 prompt of problem `index` in [0, num_problems)."""
        raise NotImplementedError

    def answer_tokens(self, prompt: jax.Array) -> jax.Array:
        """[H] int32 oracle response to `prompt`: the answer's tokens, EOS, then PAD."""
        raise NotImplementedError

    # -- splits -----------------------------------------------------------------------------
    def is_held_out(self, index: jax.Array) -> jax.Array:
        held = jnp.asarray(self.held_out)
        pos = jnp.clip(jnp.searchsorted(held, index), 0, held.shape[0] - 1)
        return held[pos] == index

    def sample_train_index(self, rng: jax.Array) -> jax.Array:
        """A problem index uniform over the training split (every problem not held out)."""

        def draw(carry):
            key, _ = carry
            key, sub = jax.random.split(key)
            return key, jax.random.randint(sub, (), 0, self.num_problems, jnp.int32)

        first = draw((rng, jnp.int32(0)))
        return jax.lax.while_loop(lambda c: self.is_held_out(c[1]), draw, first)[1]

    def _state(self, prompt: jax.Array) -> TaskState:
        pad = jnp.full((self.response_length,), PAD, jnp.int32)
        return TaskState(tokens=jnp.concatenate([prompt.astype(jnp.int32), pad]), t=jnp.zeros((), jnp.int32))

    # -- FuncEnv ----------------------------------------------------------------------------
    def initial(self, rng: jax.Array, params: Any = None) -> TaskState:
        """A prompt from the training split, and an empty response."""
        return self._state(self.problem_tokens(self.sample_train_index(rng)))

    def initial_held_out(self, i: jax.Array) -> TaskState:
        """The held-out problem i (mod held_out_size), and an empty response."""
        index = jnp.asarray(self.held_out)[jnp.asarray(i, jnp.int32) % self.held_out_size]
        return self._state(self.problem_tokens(index))

    def transition(self, state: TaskState, action: Any, rng: Any = None, params: Any = None) -> TaskState:
        """Writes the token at the next response position."""
        pos = self.prompt_length + jnp.minimum(state.t, self.response_length - 1)
        tokens = state.tokens.at[pos].set(jnp.asarray(action, jnp.int32))
        return TaskState(tokens=tokens, t=state.t + 1)

    def observation(self, state: TaskState, rng: Any = None, params: Any = None) -> jax.Array:
        return state.tokens.astype(jnp.float32)

    def terminal(self, state: TaskState, rng: Any = None, params: Any = None) -> jax.Array:
        """The last token written is EOS, or the response is full."""
        last = state.tokens[self.prompt_length + jnp.maximum(state.t - 1, 0)]
        return (state.t > 0) & ((last == EOS) | (state.t >= self.response_length))

    def reward(self, state: TaskState, action: Any, next_state: TaskState, rng: Any = None, params: Any = None):
        """At the EOS step: 1 for the exact answer, plus format_reward if well formed; else 0."""
        p = self.default_params if params is None else params
        response = next_state.tokens[self.prompt_length :]
        correct = jnp.all(response == self.answer_tokens(next_state.tokens[: self.prompt_length]))
        at_eos = jnp.asarray(action, jnp.int32) == EOS
        return jnp.where(at_eos, correct.astype(jnp.float32) + p.format_reward * well_formed(response), 0.0)

    # -- the oracle -------------------------------------------------------------------------
    def oracle_action(self, obs: jax.Array) -> jax.Array:
        """The oracle's next token in the buffer `obs` [..., P + H] (float or int ids), for a
        buffer that holds the oracle's own response so far (teacher forcing)."""
        tokens = jnp.asarray(obs).astype(jnp.int32)
        t = jnp.sum(tokens[..., self.prompt_length :] != PAD, axis=-1)
        answer = jnp.vectorize(self.answer_tokens, signature="(p)->(h)")(tokens[..., : self.prompt_length])
        return jnp.take_along_axis(answer, jnp.minimum(t, self.response_length - 1)[..., None], axis=-1)[..., 0]

    def decode(self, tokens: Any) -> str:
        """The text of a token buffer, PAD dropped (for display)."""
        return "".join(VOCAB[int(i)] if int(i) != EOS else "$" for i in np.asarray(tokens).ravel() if int(i) != PAD)


def well_formed(response: jax.Array) -> jax.Array:
    """1.0 for one or more digits, then EOS (then anything, which is PAD in a real episode)."""
    is_eos = response == EOS
    first_eos = jnp.argmax(is_eos)
    before = jnp.arange(response.shape[0]) < first_eos
    digits_before = jnp.all(jnp.where(before, response < 10, True))
    return (jnp.any(is_eos) & (first_eos > 0) & digits_before).astype(jnp.float32)


def _digits(value: jax.Array, n: int) -> jax.Array:
    """[n] decimal digits of `value`, most significant first (zero-padded)."""
    powers = jnp.asarray([10 ** (n - 1 - i) for i in range(n)], jnp.int32)
    return (value // powers) % 10


class Addition(SequenceTask):
    """a + b for a, b uniform in 0..999.

    Prompt: both operands as three digits (zero-padded), "+", "=": "057+938=" (8 tokens).
    Answer: the sum's digits **least significant first**, no leading zeros, then EOS:
    57 + 938 = 995 is "599" EOS; 0 + 0 is "0" EOS. Writing the low digit first lets a model
    compute each digit from the operands and one carry, the order a person adds in. At most 4
    digits + EOS: response length 5.
    """

    id = "Addition-v0"
    prompt_length = 8
    response_length = 5
    num_problems = 1000 * 1000

    def problem_tokens(self, index: jax.Array) -> jax.Array:
        index = jnp.asarray(index, jnp.int32)
        a, b = index // 1000, index % 1000
        return jnp.concatenate([_digits(a, 3), jnp.asarray([PLUS]), _digits(b, 3), jnp.asarray([EQUALS])])

    def answer_tokens(self, prompt: jax.Array) -> jax.Array:
        prompt = jnp.asarray(prompt, jnp.int32)
        weights = jnp.asarray([100, 10, 1], jnp.int32)
        total = jnp.sum(prompt[0:3] * weights) + jnp.sum(prompt[4:7] * weights)
        n = 1 + (total >= 10) + (total >= 100) + (total >= 1000)
        low_first = (total // jnp.asarray([1, 10, 100, 1000], jnp.int32)) % 10
        pos = jnp.arange(self.response_length)
        return jnp.where(pos < n, jnp.pad(low_first, (0, 1)), jnp.where(pos == n, EOS, PAD)).astype(jnp.int32)


class SortDigits(SequenceTask):
    """Sort five digits: prompt "53812=" (6 tokens), answer "12358" EOS (response length 6).

    Every digit sequence of length 5 is a problem (100,000); duplicates stay ("3303" sorts to
    "0333").
    """

    id = "Sort-v0"
    prompt_length = 6
    response_length = 6
    num_problems = 10**5

    def problem_tokens(self, index: jax.Array) -> jax.Array:
        return jnp.concatenate([_digits(jnp.asarray(index, jnp.int32), 5), jnp.asarray([EQUALS])])

    def answer_tokens(self, prompt: jax.Array) -> jax.Array:
        digits = jnp.sort(jnp.asarray(prompt, jnp.int32)[:5])
        return jnp.concatenate([digits, jnp.asarray([EOS])]).astype(jnp.int32)


TASKS: tuple[type[SequenceTask], ...] = (Addition, SortDigits)


class HeldOutVecEnv(VecEnv):
    """N copies of a task that reset to its held-out problems in order (env i to problem
    i // repeat), with the format reward off: the return of an episode is 1 for an exact answer.

    Only the reset is fixed; an episode that ends mid-run starts a training-split one, which
    `kl_rl.rollout.evaluate` does not count (it scores each env's first episode).
    """

    def __init__(self, env: SequenceTask, num_envs: int, repeat: int = 1):
        super().__init__(env, num_envs, params=TaskParams(format_reward=0.0))
        self.repeat = int(repeat)

    def reset(self, key: jax.Array, batch_like: Any = ()) -> VecEnvState:
        del key, batch_like
        index = jnp.arange(self.num_envs, dtype=jnp.int32) // self.repeat
        env_state = jax.vmap(self.env.initial_held_out)(index)
        obs = jax.vmap(self.env.observation)(env_state)
        zeros = jnp.zeros(self.num_envs, jnp.int32)
        return VecEnvState(env_state, obs.astype(jnp.float32), zeros, jnp.zeros(self.num_envs, jnp.float32), zeros)


def pass_at_k(num_samples: int, num_correct: Any, k: int) -> np.ndarray:
    """The unbiased pass@k of Chen et al. (2021): 1 - C(n - c, k) / C(n, k) per problem."""
    c = np.asarray(num_correct, np.int64)
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@k needs 1 <= k <= samples per problem, got k={k} with {num_samples} samples")
    values = [1.0 - math.comb(num_samples - int(ci), k) / math.comb(num_samples, k) for ci in c.ravel()]
    return np.asarray(values).reshape(c.shape)
