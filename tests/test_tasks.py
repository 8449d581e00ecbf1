"""The verifiable token tasks (kl_rl.envs.tasks): tokenization, the verifier's reward and episode
ends, autoreset, the held-out split, grouped resets, and pass@k.

An LM's reward is only as good as its verifier, and a wrong episode end (truncated where it should
be terminated, a reward one step late) silently biases every algorithm trained on it, so these
check each piece against a value written out by hand or recomputed in plain Python.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kl_rl import envs, rollout
from kl_rl.agents import lm
from kl_rl.distributions import Categorical
from kl_rl.envs import VecEnv
from kl_rl.envs.tasks import EOS, EQUALS, PAD, PLUS, HeldOutVecEnv, TaskParams, TokenSpace, pass_at_k, well_formed

# Module-scoped fixtures: the whole file runs on one pytest-xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_tasks")

ADD = envs.make("Addition-v0")
SORT = envs.make("Sort-v0")


def _ids(text):
    """Token ids of a string in the tasks' vocabulary: digits, '+', '=', '$' for EOS, '_' for PAD."""
    table = {"+": PLUS, "=": EQUALS, "$": EOS, "_": PAD}
    return [table[c] if c in table else int(c) for c in text]


def _run(runs, steps, key=0):
    """Resets each vec env of `runs` [(vec, policy)] and steps it `steps` times with actions
    policy(obs), all in one jitted program (each compilation costs more than the envs' steps).

    Returns, per run, the stacked observations acted on [T, N, L], actions [T, N] and StepOuts
    (leaves [T, N, ...]).
    """

    def one(vec, policy, key):
        reset_key, step_key = jax.random.split(key)

        def step(state, k):
            action = policy(state.obs)
            next_state, out = vec.step(k, state, action)
            return next_state, (state.obs, action, out)

        _, xs = jax.lax.scan(step, vec.reset(reset_key), jax.random.split(step_key, steps))
        return xs

    def run(key):
        return [one(vec, policy, k) for (vec, policy), k in zip(runs, jax.random.split(key, len(runs)), strict=True)]

    return jax.tree.map(np.asarray, jax.jit(run)(jax.random.key(key)))


def _first_eos(action):
    """[N] the step of each env's first EOS in actions [T, N] (every env must have one)."""
    assert (action == EOS).any(axis=0).all()
    return (action == EOS).argmax(axis=0)


# -- tokenization -------------------------------------------------------------------------------


def test_the_registry_lists_both_tasks_with_token_spaces():
    assert set(envs.TASK_IDS) == {"Addition-v0", "Sort-v0"} and set(envs.TASK_IDS) <= set(envs.ENV_IDS)
    for env, (p, h) in ((ADD, (8, 5)), (SORT, (6, 6))):
        space = env.observation_space
        assert isinstance(space, TokenSpace) and envs.is_token_space(space)
        assert (space.prompt_length, space.response_length, space.shape) == (p, h, (p + h,))
        assert (space.pad, space.eos, space.vocab_size, env.action_space.n) == (PAD, EOS, 14, 14)
        assert space.vocab[PAD] == "<pad>" and space.vocab[EOS] == "<eos>" and space.task is env
    assert not envs.is_token_space(envs.make("CartPole-v1").observation_space)


@pytest.mark.parametrize(
    "a,b,prompt,answer",
    [
        (57, 938, "057+938=", "599$_"),  # 995, low digit first
        (0, 0, "000+000=", "0$___"),
        (999, 999, "999+999=", "8991$"),  # 1998: four digits and EOS fill the response
        (5, 5, "005+005=", "01$__"),  # 10: the carry makes a second digit
        (100, 0, "100+000=", "001$_"),  # inner zeros stay
    ],
)
def test_addition_tokenizes_prompt_and_answer(a, b, prompt, answer):
    tokens = ADD.problem_tokens(a * 1000 + b)
    assert tokens.tolist() == _ids(prompt)
    assert ADD.answer_tokens(tokens).tolist() == _ids(answer)
    assert ADD.decode(jnp.concatenate([tokens, ADD.answer_tokens(tokens)])) == prompt + answer.replace("_", "")


def test_addition_answers_are_the_sums_digits_reversed():
    """Every one of 2000 random problems: the answer read back (digits before EOS, reversed) is a + b."""
    index = np.random.default_rng(0).integers(0, ADD.num_problems, 2000)
    prompts = jax.vmap(ADD.problem_tokens)(jnp.asarray(index, jnp.int32))
    answers = np.asarray(jax.vmap(ADD.answer_tokens)(prompts))
    for i, answer in zip(index, answers, strict=True):
        n = list(answer).index(EOS)
        assert all(t < 10 for t in answer[:n]) and all(t == PAD for t in answer[n + 1 :])
        assert int("".join(map(str, answer[:n][::-1]))) == (i // 1000) + (i % 1000)
        assert n == 1 or answer[n - 1] != 0  # no leading zero (the last digit written)


@pytest.mark.parametrize("index,prompt,answer", [(53812, "53812=", "12358$"), (3303, "03303=", "00333$"),
                                                 (0, "00000=", "00000$"), (99999, "99999=", "99999$")])  # fmt: skip
def test_sort_tokenizes_prompt_and_answer(index, prompt, answer):
    tokens = SORT.problem_tokens(index)
    assert tokens.tolist() == _ids(prompt)
    assert SORT.answer_tokens(tokens).tolist() == _ids(answer)


def test_the_oracle_reads_its_own_partial_answer():
    """oracle_action on the buffer holding its first t answer tokens is answer token t (float buffers too)."""
    prompt = ADD.problem_tokens(57 * 1000 + 938)
    answer = _ids("599$")
    for t in range(len(answer)):
        buffer = jnp.asarray(prompt.tolist() + answer[:t] + [PAD] * (5 - t), jnp.float32)
        assert int(ADD.oracle_action(buffer)) == answer[t]
    batch = jnp.stack([jnp.asarray(prompt.tolist() + answer[:t] + [PAD] * (5 - t)) for t in range(4)])
    assert ADD.oracle_action(batch).tolist() == answer


def test_well_formed_is_digits_then_eos():
    cases = {"599$_": 1.0, "0$___": 1.0, "8991$": 1.0, "$____": 0.0, "59+$_": 0.0, "59999": 0.0, "5=9$_": 0.0,
             "5$9__": 1.0}  # fmt: skip
    for text, want in cases.items():
        assert float(well_formed(jnp.asarray(_ids(text)))) == want, text


# -- the verifier and episode ends --------------------------------------------------------------


def _answering(make_answer):
    """A policy writing make_answer(oracle answer [5]) -> [5] token by token; env i uses
    make_answer[i % len(make_answer)] when given a list."""
    makers = make_answer if isinstance(make_answer, list) else [make_answer]

    def policy(obs):
        tokens = obs.astype(jnp.int32)
        t = jnp.sum(tokens[:, 8:] != PAD, axis=-1)
        oracle = jax.vmap(ADD.answer_tokens)(tokens[:, :8])
        variants = jnp.stack([jax.vmap(m)(oracle) for m in makers])  # [M, N, 5]
        ans = variants[jnp.arange(obs.shape[0]) % len(makers), jnp.arange(obs.shape[0])]
        return jnp.take_along_axis(ans, t[:, None], axis=-1)[:, 0]

    return policy


def _first_digit(f):
    return lambda ans: jnp.where(jnp.arange(5) == 0, f(ans[0]), ans)


RIGHT = lambda ans: ans  # noqa: E731
WRONG = _first_digit(lambda d: (d + 1) % 10)  # a well-formed wrong answer
EMPTY = lambda ans: jnp.full_like(ans, EOS)  # noqa: E731  EOS first: no digits, malformed
NOT_DIGIT = _first_digit(lambda d: PLUS)  # malformed


def _sevens(obs):
    """Never EOS: the digit 7 at every step."""
    return jnp.full(obs.shape[:1], 7, jnp.int32)


@pytest.fixture(scope="module")
def runs():
    """Every rollout of the tests below, 6 steps each, in one compiled program."""
    graded = envs.make("Addition-v0")
    graded.default_params = TaskParams(format_reward=0.5)  # a training format reward
    four = _answering([RIGHT, WRONG, EMPTY, NOT_DIGIT])
    plan = {
        "oracle": (VecEnv(ADD, 64), ADD.oracle_action),
        "format 0": (VecEnv(ADD, 16, params=TaskParams(format_reward=0.0)), four),
        "format 0.25": (VecEnv(ADD, 16, params=TaskParams(format_reward=0.25)), four),
        "no eos": (VecEnv(ADD, 8, params=TaskParams(format_reward=0.5)), _sevens),
        "held out": (envs.vectorize(graded, 40, evaluation=True), _answering([RIGHT, WRONG])),
        "training": (envs.vectorize(graded, 40), _answering([RIGHT, WRONG])),
        "grouped": (envs.vectorize(ADD, 32, group_size=4), _sevens),
        "ungrouped": (envs.vectorize(ADD, 32), _sevens),
    }
    return dict(zip(plan, _run(list(plan.values()), 6), strict=True))


def test_the_oracle_earns_one_exactly_at_eos_and_terminates_there(runs):
    obs, action, out = runs["oracle"]
    lengths = _first_eos(action)
    assert set(lengths.tolist()) >= {3, 4}  # 3- and 4-digit sums among the 64 problems
    for i in range(64):
        n = lengths[i]
        np.testing.assert_array_equal(out.reward[: n + 1, i], [0.0] * n + [1.0])
        np.testing.assert_array_equal(out.terminated[: n + 1, i], [False] * n + [True])
        assert not out.truncated[: n + 1, i].any()
        assert out.episode_return[n, i] == 1.0 and out.episode_length[n, i] == n + 1
        # The true last buffer holds the prompt and the oracle's answer.
        np.testing.assert_array_equal(out.final_obs[n, i, 8:], ADD.answer_tokens(obs[0, i, :8]))


def test_a_wrong_answer_earns_zero_and_the_format_reward_only_if_well_formed(runs):
    """Env i answers right, well formed but wrong, EOS first, or with a non-digit (i % 4), with
    format reward 0 and 0.25."""
    want = np.array([[1.0, 0.0, 0.0, 0.0], [1.25, 0.25, 0.0, 0.0]])
    for row, (_, action, out) in enumerate((runs["format 0"], runs["format 0.25"])):
        first = _first_eos(action)
        for i in range(16):
            n = first[i]
            assert out.terminated[n, i] and not out.terminated[:n, i].any()
            assert out.reward[n, i] == want[row, i % 4], (row, i)
            assert not out.reward[:n, i].any()


def test_a_response_without_eos_is_terminated_at_the_response_length_with_zero_reward(runs):
    """Never emitting EOS fills the buffer: terminated (not truncated) at step 5, no reward even
    with a format reward, and the next observation is a fresh prompt."""
    obs, _, out = runs["no eos"]
    assert not out.terminated[:4].any() and out.terminated[4].all()
    assert not out.truncated.any()
    assert not out.reward.any()
    np.testing.assert_array_equal(out.final_obs[4, :, 8:], 7.0)
    np.testing.assert_array_equal(obs[5, :, 8:], PAD)  # the reset buffer; its first token was acted on
    np.testing.assert_array_equal(out.obs[5, :, 8:], [[7.0] + [PAD] * 4] * 8)


def test_the_observation_after_eos_is_a_fresh_prompt_with_an_empty_response(runs):
    obs, action, out = runs["oracle"]
    first = _first_eos(action)
    for i in range(64):
        n = first[i]
        fresh = out.obs[n, i]
        np.testing.assert_array_equal(fresh[8:], PAD)
        np.testing.assert_array_equal(fresh[[3, 7]], [PLUS, EQUALS])
        assert np.all(fresh[[0, 1, 2, 4, 5, 6]] < 10)
        assert not np.array_equal(fresh[:8], obs[0, i, :8])  # a new problem (1 in 10^6 to repeat)
        if n + 1 < 5:
            np.testing.assert_array_equal(obs[n + 1, i], fresh)  # what the next step acts on


def test_responses_pad_after_eos_and_mask_it_out():
    """A real rollout through rollout.collect with the oracle acting: each env's first response is
    kept; in its token buffer the steps after its EOS (digits of the next episode's answer) become
    PAD, and its mask and reward are 0 there."""
    vec = VecEnv(ADD, 32)

    def act(key, obs):
        action = ADD.oracle_action(obs)
        return action, jnp.zeros(action.shape), Categorical(jnp.zeros((*action.shape, 14)))

    collector = rollout.init_collector(vec.reset(jax.random.key(0)), vec.observation_space.shape)
    _, traj, _ = rollout.collect(jax.random.key(1), act, vec, collector, 5, False)
    b = jax.tree.map(np.asarray, lm.responses(traj, 8, PAD))
    action = np.asarray(traj.action)
    short = 0
    for i in range(32):
        answer = np.asarray(ADD.answer_tokens(traj.obs[0, i, :8]))
        n = list(answer).index(EOS) + 1  # response length, EOS included
        np.testing.assert_array_equal(b.action[i, :n], answer[:n])
        np.testing.assert_array_equal(b.mask[i], [1.0] * n + [0.0] * (5 - n))
        # The prompt, the answer, EOS, then PAD.
        np.testing.assert_array_equal(b.tokens[i], np.concatenate([traj.obs[0, i, :8], answer]))
        np.testing.assert_array_equal(b.reward[i], [0.0] * (n - 1) + [1.0] + [0.0] * (5 - n))
        if n < 5:
            short += 1
            assert action[n, i] < 10  # the rollout did act after EOS: `responses` dropped it
    assert 0 < short < 32


# -- the held-out split -------------------------------------------------------------------------


@pytest.mark.parametrize("env", [ADD, SORT], ids=["Addition", "Sort"])
def test_the_held_out_split_is_fixed_sorted_and_never_drawn_by_training(env):
    held = env.held_out
    assert held.shape == (512,) and np.all(np.diff(held) > 0) and held[0] >= 0 and held[-1] < env.num_problems
    np.testing.assert_array_equal(type(env)().held_out, held)  # the same split in every instance
    assert np.asarray(jax.vmap(env.is_held_out)(jnp.asarray(held))).all()
    others = np.setdiff1d(np.arange(0, env.num_problems, 97), held)
    assert not np.asarray(jax.vmap(env.is_held_out)(jnp.asarray(others))).any()
    # 20,000 draws: without the rejection, Addition would draw ~10 held-out problems, Sort ~100.
    index = jax.vmap(env.sample_train_index)(jax.random.split(jax.random.key(0), 20_000))
    assert not np.asarray(jax.vmap(env.is_held_out)(index)).any()
    assert np.unique(np.asarray(index)).size > 15_000  # still spread over the training split


def test_training_resets_never_start_a_held_out_problem():
    """Through VecEnv.reset on Sort (4096 envs; uniform draws would hit ~21 held-out problems)."""
    obs = np.asarray(VecEnv(SORT, 4096).reset(jax.random.key(3)).obs).astype(int)
    index = obs[:, :5] @ (10 ** np.arange(4, -1, -1))
    assert not np.isin(index, SORT.held_out).any()
    assert np.unique(index).size > 3900


def test_held_out_envs_reset_env_i_to_problem_i_with_no_format_reward(runs):
    """The runs' env has a training format reward of 0.5; even envs answer right, odd ones well
    formed but wrong."""
    assert isinstance(envs.vectorize(ADD, 40, evaluation=True), HeldOutVecEnv)
    assert type(envs.vectorize(ADD, 40)) is VecEnv
    want = np.asarray(jax.vmap(ADD.problem_tokens)(jnp.asarray(ADD.held_out[:40])))
    other_key = np.asarray(envs.vectorize(ADD, 40, evaluation=True).reset(jax.random.key(7)).obs)
    for obs in (runs["held out"][0][0], other_key):  # whatever the key
        np.testing.assert_array_equal(obs[:, :8], want)
        np.testing.assert_array_equal(obs[:, 8:], PAD)
    for (_, action, out), wrong_reward in ((runs["held out"], 0.0), (runs["training"], 0.5)):
        reward = out.reward[_first_eos(action), np.arange(40)]
        # Off in evaluation, where a return is exact-match accuracy; on in training.
        np.testing.assert_array_equal(reward, np.tile([1.0 + wrong_reward, wrong_reward], 20))


def test_repeat_gives_each_held_out_problem_to_consecutive_envs():
    obs = np.asarray(HeldOutVecEnv(SORT, 12, repeat=3).reset(jax.random.key(0)).obs)
    want = np.asarray(jax.vmap(SORT.problem_tokens)(jnp.asarray(SORT.held_out[:4])))
    np.testing.assert_array_equal(obs[:, :6], np.repeat(want, 3, axis=0))


# -- grouped resets ----------------------------------------------------------------------------


def test_group_size_resets_each_group_to_one_prompt(runs):
    assert envs.vectorize(ADD, 32, group_size=4).group_size == 4
    grouped, _, out = runs["grouped"]
    obs = grouped[0].reshape(8, 4, 13)  # the reset
    np.testing.assert_array_equal(obs, np.repeat(obs[:, :1], 4, axis=1))
    assert len({tuple(g[0, :8]) for g in obs}) == 8  # 8 groups, 8 different prompts
    # Without groups, neighbours differ.
    assert len({tuple(p[:8]) for p in runs["ungrouped"][0][0]}) == 32
    # An episode that ends mid-rollout restarts on its own: autoreset prompts are not grouped.
    assert out.terminated[4].all()
    assert len({tuple(p[:8]) for p in out.obs[4]}) > 8
    with pytest.raises(ValueError, match="must divide"):
        VecEnv(ADD, 30, group_size=4)


# -- pass@k ------------------------------------------------------------------------------------


def _pass_at_k_by_enumeration(n, c, k):
    """The fraction of the k-subsets of n samples (c of them correct) that hold a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration_and_its_closed_forms():
    for n in range(1, 7):
        for c in range(n + 1):
            got = pass_at_k(n, [c], 1)
            assert got.shape == (1,) and got[0] == pytest.approx(c / n, abs=1e-12)
            for k in range(1, n + 1):
                want = _pass_at_k_by_enumeration(n, c, k)
                assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (n, c, k)
    np.testing.assert_array_equal(pass_at_k(10, [0, 0], 5), [0.0, 0.0])
    np.testing.assert_array_equal(pass_at_k(10, [10], 3), [1.0])
    assert pass_at_k(10, [[1, 2], [3, 4]], 2).shape == (2, 2)
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - math.comb(7, 2) / math.comb(10, 2))
    for k in (0, 11):
        with pytest.raises(ValueError, match="1 <= k"):
            pass_at_k(10, [3], k)
