"""The token-task agents (kl_rl.agents.lm): the KL placements' expected gradients, the causal
transformer's one-pass scorer against its per-step sampler, the advantage and loss arithmetic by
hand, and short runs of SFT, GRPO, RLOO, PPO-LM and online DPO from an SFT reference.

The runs are tiny (one layer, width 16, 16 responses per update) and compiling them is most of
this file's time: SFT runs through kl_rl.runner (it is the others' reference run folder), and GRPO
and PPO-LM take one update each, with two online-DPO updates, inside one compiled program whose
results the checks read. RLOO's own program is in a slow test.
"""

import csv
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kl_rl import buffer, envs, kl, networks, resolve, runner, sources
from kl_rl import config as config_lib
from kl_rl.agents import ALGOS, lm
from kl_rl.agents.lm import losses
from kl_rl.cli import main
from kl_rl.distributions import Categorical, categorical
from kl_rl.envs.tasks import EOS, PAD
from kl_rl.errors import ConfigError
from kl_rl.divergence import NAN_BY_DESIGN
from kl_rl.train import make_trainer
from kl_rl.agents.base import UpdateContext

# Module-scoped fixtures: the whole file runs on one pytest-xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_lm")

ENV = "Addition-v0"
ADD = envs.make(ENV)
P, H, V = 8, 5, 14  # Addition's prompt length, response length, vocabulary
TINY = {"layers": 1, "width": 16, "heads": 2, "num_envs": 16, "eval_episodes": 16}


# -- the expected gradients of the KL placements, by exact summation over the vocabulary --------


def _expected_grad(theta, term):
    """E_{x ~ stop_grad(pi_theta)}[grad_theta term(theta, x)], summed exactly over the vocabulary.

    `term(theta, actions)` -> [V] per-token values at every token; x's sampling is held fixed (the
    weights are stop-gradient), as when the tokens of a batch are given.
    """

    def surrogate(theta):
        log_pi = jax.nn.log_softmax(theta)
        return jnp.sum(jax.lax.stop_gradient(jnp.exp(log_pi)) * term(theta, jnp.arange(theta.shape[-1])))

    return jax.grad(surrogate)(theta)


def test_kl_placements_have_the_documented_expected_gradients():
    """k1 as a loss: zero; k2: grad KL(pi || ref); k3 (GRPO's): grad KL(ref || pi); k1 in the
    reward through the score function: grad KL(pi || ref). Float64, to 1e-9."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        theta = jnp.asarray(rng.normal(size=5) * 1.5)
        ref_logits = jnp.asarray(rng.normal(size=5) * 1.5)
        ref = Categorical(ref_logits)
        assert theta.dtype == jnp.float64
        # k3 sums a Taylor series below |log r| = 0.2 (good to ~1e-7): these logits stay above it.
        assert np.all(np.abs(Categorical(theta).log_probs - ref.log_probs) > 0.2)

        def penalty(estimator):
            return lambda t, x: kl.anchor_penalty(Categorical(t), ref, x, estimator, "reverse")

        def in_reward(t, x):  # REINFORCE on -k1: stop_grad(k1(x)) * log pi(x)
            log_pi = Categorical(t).log_prob(x)
            return jax.lax.stop_gradient(kl.anchor_kl_estimate(log_pi, ref.log_prob(x), "k1")) * log_pi

        @jax.jit
        def grads(theta):
            out = {e: _expected_grad(theta, penalty(e)) for e in ("k1", "k2", "k3")}
            out["reward"] = _expected_grad(theta, in_reward)
            out["reverse"] = jax.grad(lambda t: kl.kl_divergence(Categorical(t), ref))(theta)
            out["forward"] = jax.grad(lambda t: kl.kl_divergence(ref, Categorical(t)))(theta)
            return out

        g = jax.tree.map(np.asarray, grads(theta))
    reverse, forward = g["reverse"], g["forward"]
    assert reverse.dtype == np.float64
    assert np.max(np.abs(reverse - forward)) > 0.1  # the two directions differ: the test can tell them apart
    assert np.max(np.abs(reverse)) > 0.1
    np.testing.assert_allclose(g["k1"], 0.0, atol=1e-12)
    np.testing.assert_allclose(g["k2"], reverse, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(g["k3"], forward, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(g["reward"], reverse, rtol=1e-9, atol=1e-12)


def test_the_abs_estimator_is_the_absolute_log_ratio_and_reverse_only():
    log_pi, log_ref = jnp.asarray([-0.5, -2.0, -1.0]), jnp.asarray([-1.5, -0.5, -1.0])
    np.testing.assert_array_equal(kl.anchor_kl_estimate(log_pi, log_ref, "abs"), [1.0, 1.5, 0.0])
    with pytest.raises(ValueError, match="no 'abs' estimator of the forward KL"):
        kl.anchor_kl_estimate(log_pi, log_ref, "abs", "forward")
    with pytest.raises(ValueError, match="reverse KL only"):
        kl.check_anchor_options("abs", "forward")
    kl.check_anchor_options("abs", "reverse", "reward")


def _token_networks(width=16):
    return networks.make_token_networks(ADD.observation_space, ADD.action_space, 1, width, 2)


def _random_params(net, seed, scale=0.3, dtype=np.float32):
    """Parameters of `net` drawn N(0, scale^2) on the host: away from the near-uniform
    initialization, so positions and tokens change the outputs by far more than the tolerances
    (and no PRNG in the compiled programs, whose compilation it would slow)."""
    shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, P + H), jnp.float32))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * scale, dtype), shapes)


def test_k3_in_the_loss_gives_the_forward_kl_gradient_through_the_transformer():
    """GRPO's per-token term: sum over the vocabulary at one position of a TokenTransformer of
    stop_grad(pi(x)) * grad k3(x) is grad_params KL(ref || pi), float64, every parameter. The
    reference masks the tokens the policy masks (PAD), as an SFT reference of the same network does."""
    policy, _ = _token_networks()
    obs = jnp.asarray([[*ADD.problem_tokens(57938).tolist(), 5, 9, PAD, PAD, PAD]], jnp.float32)
    with jax.enable_x64(True):
        params = _random_params(policy, 0, dtype=np.float64)
        log_pi = np.asarray(jax.jit(lambda p: policy.apply(p, obs).log_probs)(params))
        allowed = np.isfinite(log_pi)
        ref = categorical(jnp.asarray(np.random.default_rng(2).normal(size=(1, V)) * 1.5), jnp.asarray(allowed))
        # k3 sums a Taylor series below |log r| = 0.2 (good to ~1e-7): this reference stays above it.
        assert np.all(np.abs(log_pi - ref.log_probs)[allowed] > 0.2)

        def expected_k3(params):
            dist = Categorical(policy.apply(params, obs).logits[:, None, :])  # [1, 1, V], every token below
            anchor = Categorical(ref.logits[:, None, :])
            # Masked tokens (probability 0 under both) are scored at token 0 and left out, so their
            # nan never meets the gradient.
            x = jnp.where(allowed, jnp.arange(V), 0)
            per_token = kl.anchor_penalty(dist, anchor, x, "k3", "reverse")
            return jnp.sum(jnp.where(allowed, jax.lax.stop_gradient(dist.probs) * per_token, 0.0))

        @jax.jit
        def grads(params):
            forward = jax.grad(lambda p: jnp.sum(kl.kl_divergence(ref, policy.apply(p, obs))))(params)
            return jax.grad(expected_k3)(params), forward

        got, forward = (jax.tree.leaves(jax.tree.map(np.asarray, t)) for t in grads(params))
    assert got[0].dtype == np.float64 and len(got) > 10
    assert max(np.max(np.abs(f)) for f in forward) > 1e-2  # (the test above tells the directions apart)
    for g, f in zip(got, forward, strict=True):
        np.testing.assert_allclose(g, f, rtol=1e-9, atol=1e-14)


# -- causality: the one-pass scorer is the per-step sampler -------------------------------------


def test_the_one_pass_scorer_equals_the_per_step_sampler():
    """policy.sequence(params, tokens) at position P - 1 + t is policy.apply on the buffer holding
    only the first t response tokens (the rest PAD); the same for the critic."""
    policy, value = _token_networks()
    rng = np.random.default_rng(0)
    prompts = np.asarray(jax.vmap(ADD.problem_tokens)(jnp.asarray(rng.integers(0, 10**6, 6), jnp.int32)))
    responses = rng.choice([*range(10), EOS, 12, 13], size=(6, H))  # any tokens but PAD
    tokens = jnp.asarray(np.concatenate([prompts, responses], axis=1), jnp.float32)

    @jax.jit
    def both_ways(p_params, v_params, tokens):
        # buffers[i, t]: response i's first t tokens, the rest PAD; one call scores them all.
        buffers = jnp.stack([tokens.at[:, P + t :].set(PAD) for t in range(H)], 1)
        steps = (policy.apply(p_params, buffers).logits, value.apply(v_params, buffers))
        one_pass = (policy.sequence(p_params, tokens).logits, value.sequence(v_params, tokens))
        return steps, one_pass

    (step_logits, step_values), (seq_logits, seq_values) = jax.tree.map(
        np.asarray, both_ways(_random_params(policy, 0), _random_params(value, 1), tokens)
    )
    assert seq_logits.shape == (6, P + H, V) and seq_values.shape == (6, P + H)
    np.testing.assert_allclose(seq_logits[:, P - 1 : P - 1 + H], step_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(seq_values[:, P - 1 : P - 1 + H], step_values, rtol=1e-5, atol=1e-5)
    # The policy never emits PAD (so a buffer's non-PAD count is the next position): its logit is
    # -inf everywhere, and only there.
    assert np.all(np.isneginf(seq_logits[..., PAD])) and np.all(np.isfinite(np.delete(seq_logits, PAD, -1)))
    # Not vacuous: each token written changes the next distribution (of the tokens it allows).
    finite = np.isfinite(step_logits).all(axis=(0, 1))
    assert np.min(np.max(np.abs(np.diff(step_logits[..., finite], axis=1)), axis=-1)) > 1e-2


# -- advantages and losses by hand ------------------------------------------------------------


def test_group_advantages_grpo_dr_grpo_and_rloo_by_hand():
    reward = jnp.asarray([3.0, 1.0, 2.0, 6.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4; the second ties
    std = math.sqrt((0 + 4 + 1 + 9) / 4)  # the population std of (3, 1, 2, 6), whose mean is 3
    centred = np.array([0.0, -2.0, -1.0, 3.0, 0.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(losses.group_advantages(reward, 4),
                               np.concatenate([centred[:4] / (std + 1e-4), centred[4:]]), rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(losses.group_advantages(reward, 4, scale=False), centred, rtol=1e-6, atol=1e-7)
    # TRL's sample std (torch.std): the same squares over G - 1 = 3.
    sample = math.sqrt((0 + 4 + 1 + 9) / 3)
    np.testing.assert_allclose(losses.group_advantages(reward, 4, std="sample"),
                               np.concatenate([centred[:4] / (sample + 1e-4), centred[4:]]), rtol=1e-6)  # fmt: skip
    # RLOO: r_i minus the mean of the other three.
    loo = [3 - (1 + 2 + 6) / 3, 1 - (3 + 2 + 6) / 3, 2 - (3 + 1 + 6) / 3, 6 - (3 + 1 + 2) / 3, 0, 0, 0, 0]
    np.testing.assert_allclose(losses.leave_one_out_advantages(reward, 4), loo, rtol=1e-6, atol=1e-7)
    # Groups of 2: RLOO's baseline is the other response, so the pair gets +-(r_0 - r_1).
    np.testing.assert_allclose(losses.leave_one_out_advantages(jnp.asarray([1.0, 0.0]), 2), [1.0, -1.0])


def test_masked_mean_three_norms_by_hand():
    x = jnp.asarray([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # sequence: each response's mean over its tokens (an empty one counts 0), then over responses.
    assert float(losses.masked_mean(x, mask, "sequence")) == pytest.approx((1.5 + 4.0 + 0.0) / 3)
    # token: over all masked tokens of the batch.
    assert float(losses.masked_mean(x, mask, "token")) == pytest.approx(7.0 / 3)
    # constant: the masked sum over responses x response length.
    assert float(losses.masked_mean(x, mask, "constant")) == pytest.approx(7.0 / 9)


def test_preference_losses_by_hand():
    chosen, rejected = jnp.asarray([0.3, -1.0, 2.0]), jnp.asarray([-0.2, 0.5, 2.0])
    h = np.asarray(chosen - rejected)
    for beta in (0.1, 2.0):
        sigmoid = np.asarray(losses.preference_loss(chosen, rejected, beta, "sigmoid"))
        np.testing.assert_allclose(sigmoid, -np.log(1.0 / (1.0 + np.exp(-beta * h))), rtol=1e-6)
        ipo = np.asarray(losses.preference_loss(chosen, rejected, beta, "ipo"))
        np.testing.assert_allclose(ipo, (h - 1.0 / (2.0 * beta)) ** 2, rtol=1e-6)
    assert float(losses.preference_loss(jnp.asarray(0.0), jnp.asarray(0.0), 0.5)) == pytest.approx(math.log(2.0))
    with pytest.raises(ValueError, match="unknown preference loss 'hinge'"):
        losses.preference_loss(chosen, rejected, 0.1, "hinge")


def test_online_dpo_pair_loss_by_hand():
    """Groups of 3: the best and the worst response form the pair; a group of ties forms none."""
    reward = jnp.asarray([0.0, 1.0, 0.5, 2.0, 2.0, 2.0, 1.0, 0.0, 0.0])
    log_ratio = jnp.asarray([0.2, -0.3, 9.0, 1.0, 2.0, 3.0, 0.4, 0.1, -5.0])
    chosen_i, rejected_i, has_pair = losses.best_and_worst(reward, 3)
    np.testing.assert_array_equal(chosen_i, [1, 0, 0])
    np.testing.assert_array_equal(rejected_i, [0, 0, 1])  # the first of tied worst responses
    np.testing.assert_array_equal(has_pair, [True, False, True])
    loss, aux = losses.pair_loss(log_ratio, reward, 3, 0.5, "sigmoid")
    chosen, rejected = np.array([-0.3, 0.4]), np.array([0.2, 0.1])
    np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-0.5 * (chosen - rejected)))), rtol=1e-6)
    np.testing.assert_allclose(aux["reward_chosen"], 0.5 * chosen.mean(), rtol=1e-6)
    np.testing.assert_allclose(aux["reward_rejected"], 0.5 * rejected.mean(), rtol=1e-6)
    np.testing.assert_allclose(aux["reward_margin"], 0.5 * (chosen - rejected).mean(), rtol=1e-6)
    assert float(aux["pair_frac"]) == pytest.approx(2 / 3)


def test_clipped_token_loss_by_hand():
    """Ratios 0.5, 1.1, 1.5 against advantages +1, -1, +1: the min of the plain and the clipped
    objective, eps 0.2 below and 0.3 above (DAPO's clip-higher), over the generated tokens."""
    log_ratio = jnp.log(jnp.asarray([[0.5, 1.1, 1.5, 7.0]]))
    advantages = jnp.asarray([[1.0, -1.0, 1.0, 1.0]])
    mask = jnp.asarray([[1.0, 1.0, 1.0, 0.0]])  # the fourth token was never generated
    loss, clip_frac = losses.clipped_token_loss(log_ratio, advantages, mask, 0.2, 0.3, "token")
    # min(0.5, 0.8) = 0.5; min(-1.1, -1.1) = -1.1; min(1.5, 1.3) = 1.3.
    assert float(loss) == pytest.approx(-(0.5 - 1.1 + 1.3) / 3, rel=1e-6)
    assert float(clip_frac) == pytest.approx(2 / 3)  # 0.5 < 0.8 and 1.5 > 1.3
    # clip_eps_high 0: the upper side is clip_eps too, min(1.5, 1.2) = 1.2.
    loss, _ = losses.clipped_token_loss(log_ratio, advantages, mask, 0.2, 0.0, "token")
    assert float(loss) == pytest.approx(-(0.5 - 1.1 + 1.2) / 3, rel=1e-6)


def test_cross_entropy_by_hand():
    """SFT's loss: -log pi of the target tokens over the generated ones; the accuracies count the
    greedy token's hits, a response being right when all its tokens are."""
    logits = jnp.log(jnp.asarray([[[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]], [[0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    action = jnp.asarray([[0, 2], [0, 0]])
    mask = jnp.asarray([[1.0, 1.0], [1.0, 0.0]])  # the second response is one token long
    log_prob = Categorical(logits).log_prob(action)
    loss, aux = losses.cross_entropy(logits, log_prob, action, mask)
    assert float(loss) == pytest.approx(-(math.log(0.5) + math.log(0.6) + math.log(0.1)) / 3, rel=1e-6)
    assert aux["nll"] is loss
    assert float(aux["token_accuracy"]) == pytest.approx(2 / 3)
    assert float(aux["sequence_accuracy"]) == 0.5


# -- configs ----------------------------------------------------------------------------------

LM_ALGOS = ("sft", "grpo", "rloo", "ppo-lm", "dpo")


@pytest.mark.parametrize("algo", LM_ALGOS)
def test_a_token_task_config_has_no_control_field_and_the_loop_reads_its_fixed_values(algo):
    """The fields of the control algorithms that a token-task agent has no use for are not flags
    (build refuses them), and what the training loop reads of every config is fixed."""
    cls = ALGOS[algo].config
    names = {f.name for f in dataclasses.fields(cls)}
    control = {"num_steps", "hidden_sizes", "activation", "distribution", "init_log_std", "normalize_obs",
               "normalize_reward", "replay_rollouts", "policy_lag", "is_correction", "rho_clip", "c_clip",
               "behaviour_kl_coef"}  # fmt: skip
    assert not names & control
    with pytest.raises(ConfigError, match="unknown hyperparameter 'num-steps'"):
        config_lib.build(cls, {"num-steps": "5"})
    config = cls()
    assert (config.num_steps, config.normalize_obs, config.normalize_reward) == (0, False, False)
    assert (config.replay_rollouts, config.policy_lag) == (1, 0)
    assert config.batch_size == config.num_envs and config.num_updates == config.total_steps // config.num_envs
    assert "num_steps" not in config_lib.to_dict(config)


def test_each_token_task_config_declares_what_its_algorithm_uses():
    fields = {algo: {f.name for f in dataclasses.fields(ALGOS[algo].config)} for algo in LM_ALGOS}
    reference = {"ref_kl_control", "ref_kl_target", "ref_kl_horizon", "ref_kl_in", "ref_kl_estimator"}
    # SFT: no reference, no sampling, no groups, no reward.
    assert not fields["sft"] & {"ref_kl_coef", "group_size", "ent_coef", "kl_penalty", "clip_eps", "format_reward"}
    # DPO: no clip and no placement of the KL, which is its loss; beta is ref_kl_coef.
    assert "ref_kl_coef" in fields["dpo"] and not fields["dpo"] & {*reference, "clip_eps", "gamma"}
    assert reference <= fields["grpo"] and reference <= fields["rloo"] and reference <= fields["ppo-lm"]
    # The critic's fields are PPO-LM's; Dr. GRPO's switch is GRPO's.
    assert {"gamma", "gae_lambda", "vf_coef", "clip_value", "normalize_advantages"} <= fields["ppo-lm"]
    assert not fields["grpo"] & {"gamma", "gae_lambda", "vf_coef"} and "scale_rewards" not in fields["rloo"]
    dpo = ALGOS["dpo"].config()
    assert (dpo.ref_kl_in, dpo.ref_kl_control, dpo.ref_kl_direction) == ("loss", "fixed", "reverse")


@pytest.mark.parametrize(
    "algo, overrides, message",
    [
        ("sft", {"num_minibatches": 3, "num_envs": 16}, "^num_minibatches 3 does not divide"),
        ("grpo", {"group_size": 3, "num_envs": 16}, "^group_size 3 does not divide"),
        ("grpo", {"group_size": 4, "num_envs": 16, "num_minibatches": 8}, "^num_minibatches 8 does not divide"),
        ("grpo", {"loss_norm": "mean"}, "unknown loss_norm 'mean'"),
        ("grpo", {"group_std": "biased"}, "unknown group_std 'biased'; use one of population, sample"),
        ("grpo", {"group_std": "sample", "group_size": 1}, "^group_std sample needs group_size >= 2"),
        ("rloo", {"clip_eps_high": -0.1}, "^clip_eps and clip_eps_high must be >= 0"),
        ("rloo", {"ref_kl_estimator": "k2", "ref_kl_direction": "forward"}, "reverse KL only"),
        ("ppo-lm", {"gae_lambda": 1.5}, "^gamma and gae_lambda must lie in"),
        ("dpo", {"group_size": 1, "num_envs": 16}, "^group_size must be >= 2"),
        ("dpo", {"dpo_loss": "hinge"}, "unknown dpo_loss 'hinge'"),
        ("dpo", {"ref_kl_coef": 0.0}, "DPO's beta and must be > 0"),
        ("sft", {"total_steps": 8, "num_envs": 16}, "less than one batch"),
    ],
)
def test_token_task_configs_refuse_values_no_run_could_use(algo, overrides, message):
    config = ALGOS[algo].config(**overrides)
    with pytest.raises(ConfigError, match=message):
        config.validate(ADD.action_space)


# -- runs -------------------------------------------------------------------------------------


def _rows(path):
    with open(path / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _finite(metrics):
    return all(np.all(np.isfinite(np.asarray(v))) for k, v in metrics.items() if k not in NAN_BY_DESIGN)


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """An SFT run (4 updates of 16 oracle answers, held-out evaluation every 2), saved: the reference."""
    result = runner.run("sft", ENV, seeds=1, total_steps=64, eval_every=2, **TINY)
    return result, result.save(tmp_path_factory.mktemp("sft") / "run")


def test_sft_trains_on_the_oracles_answers(sft):
    result, _ = sft
    m = {k: np.asarray(v)[0] for k, v in result.metrics.items()}
    assert _finite(result.metrics)
    assert "kl_ref" not in m and "kl" not in m
    np.testing.assert_array_equal(m["env_steps"], [80, 160, 240, 320])  # 16 responses x 5 positions
    # Teacher forcing: the oracle acts, so every response is right and its answer's length.
    np.testing.assert_array_equal(m["reward"], 1.0)
    np.testing.assert_array_equal(m["episode_return"], 1.0)
    assert np.all((m["response_length"] >= 2) & (m["response_length"] <= 5))
    np.testing.assert_array_equal(m["response_length"], m["episode_length"])
    assert m["nll"][-1] < m["nll"][0] <= math.log(V) + 0.1
    assert np.all((m["token_accuracy"] >= 0) & (m["token_accuracy"] <= 1))
    assert 0.0 <= result.final_returns[0] <= 1.0 and (result.final_returns[0] * 16) % 1 == 0


def test_sft_stops_for_good_once_its_greedy_accuracy_reaches_the_target():
    """stop_at_accuracy: an update that finds the policy at the target (or after it stopped)
    leaves the agent as it was; below the target the policy trains."""
    config = resolve.resolve_config("sft", ENV, None, {**TINY, "total_steps": 16 * 5 * 2, "stop_at_accuracy": 0.5})
    trainer = make_trainer("sft", config, envs.make(ENV))

    @jax.jit
    def two_updates(stopped):
        start = trainer.init(jax.random.key(0), config)
        start = start.replace(agent=start.agent.replace(stopped=stopped))
        return start, *trainer.run(start, config, 2)

    for stopped in (False, True):
        start, end, metrics = two_updates(jnp.asarray(stopped))
        moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(start.agent.params),
                                                           jax.tree.leaves(end.agent.params), strict=True)]  # fmt: skip
        np.testing.assert_array_equal(metrics["stopped"], float(stopped))
        assert np.all(np.asarray(metrics["accuracy_before"]) < 0.5)  # an untrained policy: far from the target
        assert all(moved) if not stopped else not any(moved), moved
    with pytest.raises(ConfigError, match="stop_at_accuracy must lie in"):
        ALGOS["sft"].config(stop_at_accuracy=1.5).validate(ADD.action_space)


def test_the_table_of_a_run_leaves_out_what_its_algorithm_does_not_have(sft, capsys):
    """SFT has no KL: `kl-rl train`'s table has no kl column rather than a column of nan."""
    from kl_rl.cli.train import _print_table

    _print_table(sft[0])
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "final_return" in line)
    assert header.split() == ["seed", "final_return", "train_return", "entropy"], header
    assert "nan" not in out.lower(), out


def test_eval_every_writes_eval_return_at_the_evaluation_points(sft):
    result, folder = sft
    rows = _rows(folder)
    assert [r["update"] for r in rows] == ["1", "2", "3", "4"]
    assert rows[0]["eval_return"] == "" and rows[2]["eval_return"] == ""
    for r in (rows[1], rows[3]):  # the point after update 2, and the final evaluation
        score = float(r["eval_return"])
        assert 0.0 <= score <= 1.0 and (score * 16) % 1 == 0  # accuracy over 16 held-out problems
    assert float(rows[3]["eval_return"]) == pytest.approx(result.final_returns[0])


# Each algorithm's batch shape is set here, not by its Addition-v0 preset. With an untrained
# reference every reward is 0, so what moves a policy is the KL to the reference, and only from a
# policy away from it: PPO-LM (and RLOO) start from their own initialization, GRPO from the
# reference (init_from_reference, the default), where its k3 term has no gradient.
ALGO_OVERRIDES = {
    "grpo": {"group_size": 4, "update_epochs": 2, "num_minibatches": 2},
    "ppo-lm": {"update_epochs": 2, "num_minibatches": 2, "init_from_reference": False},
    "rloo": {"group_size": 4, "update_epochs": 2, "num_minibatches": 2, "init_from_reference": False},
}
DPO_OVERRIDES = {"group_size": 2, "update_epochs": 1, "num_minibatches": 1}


def _dpo_batch(data):
    """A rollout with verifier rewards rewritten at each response's EOS step, so that 8 groups of
    2 hold pairs (1, 0), (0, 1) and ties (0, 0), (1, 1) in turn."""
    valid = buffer.in_first_episode(data)
    last = valid & (data.terminated | data.truncated)
    per_env = jnp.asarray([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0] * 2)
    return data._replace(reward=jnp.where(last, per_env[None, :], 0.0))


def _one_update_each(folder, algos, dpo=False):
    """One update of each of `algos` from the run `folder` as reference, in one compiled program
    (each compilation costs seconds, the updates milliseconds). With `dpo`, also two online-DPO
    updates on GRPO's rollout, vmapped: from the reference on its rewards (all 0: no pair), and
    from a policy moved away from the reference on rewards rewritten by `_dpo_batch`."""
    made = {}
    for algo in algos:
        config = resolve.resolve_config(algo, ENV, None, {**TINY, "total_steps": 16, "eval_every": 0,
                                                         **ALGO_OVERRIDES[algo]})  # fmt: skip
        anchors = sources.resolve_sources(algo, ENV, config, reference=folder)
        trainer = make_trainer(algo, config, envs.make(ENV), anchors.reference)
        made[algo] = (config, trainer, jax.tree.map(lambda x: x[0], anchors.setup([0])))
    dpo_config = resolve.resolve_config("dpo", ENV, None, {**TINY, "total_steps": 16, **DPO_OVERRIDES})
    dpo_agent = ALGOS["dpo"].make(dpo_config, ADD.observation_space, ADD.action_space)
    noise = _random_params(_token_networks()[0], 5, scale=0.1)

    def program(setups, noise):
        out = {}
        for algo, (config, trainer, _) in made.items():
            start = trainer.init(jax.random.key(0), config, setups[algo])
            state, metrics = trainer.run(start, config, 1)
            out[algo] = {"start": start, "state": state, "metrics": jax.tree.map(lambda x: x[0], metrics)}
        if dpo:
            reference = setups["grpo"].reference.agent.params["policy"]
            start = dpo_agent.init(jax.random.key(7)).replace(params={"policy": reference})
            moved = start.replace(params={"policy": jax.tree.map(jnp.add, reference, noise)})
            data = buffer.ordered(out["grpo"]["state"].buffer)
            states, batches = jax.tree.map(lambda *x: jnp.stack(x), (moved, _dpo_batch(data)), (start, data))

            def update(state, batch):
                ctx = UpdateContext(jnp.float32(0), dpo_config.ref_kl_coef)
                return dpo_agent.update(jax.random.key(6), state, batch, ctx)

            new, metrics = jax.vmap(update)(states, batches)
            both = {"start": states, "new": new, "data": batches, "metrics": metrics}
            for i, name in enumerate(("dpo pairs", "dpo ties")):
                out[name] = jax.tree.map(lambda x, i=i: x[i], both)
        return out

    out = jax.jit(program)({algo: v[2] for algo, v in made.items()}, noise)
    return {"made": {**made, "dpo": (dpo_config, None, None)}, **out}


@pytest.fixture(scope="module")
def rl(sft):
    """GRPO and PPO-LM one update each, and two online-DPO updates (`_one_update_each`)."""
    return _one_update_each(sft[1], ["grpo", "ppo-lm"], dpo=True)


_responses = jax.jit(lm.responses, static_argnums=(1, 2))


@jax.jit
def _scored_logits(params, tokens):
    policy, _ = _token_networks()
    return policy.sequence(params, tokens).logits[:, P - 1 : P - 1 + H]


def _scored(params, tokens):
    """The policy's response distributions [n, H, V] in one pass, as the agents score them."""
    return Categorical(_scored_logits(params, tokens))


@jax.jit
def _exact(tokens):
    answers = jax.vmap(ADD.answer_tokens)(tokens[:, :P].astype(jnp.int32))
    return jnp.all(tokens[:, P:].astype(jnp.int32) == answers, -1).astype(jnp.float32)


def _verifier(b):
    """[n] 1.0 where a response (PAD after its EOS) is the exact answer to its prompt."""
    return np.asarray(_exact(jnp.asarray(b.tokens)))


def _kl_ref(params, b):
    """The exact KL(pi || pi_ref) at each token, summed over each response, averaged."""
    per_token = np.asarray(jax.jit(kl.kl_divergence)(_scored(params, b.tokens), b.ref_dist))
    return np.mean(np.sum(np.where(np.asarray(b.mask) > 0, per_token, 0.0), -1))


def _check_one_update(runs, algo):
    """What every RL algorithm's update logs, against the rollout it learned from."""
    run, (config, _, setup) = runs[algo], runs["made"][algo]
    m = run["metrics"]
    assert _finite(m)
    for name in ("kl_ref", "reward", "response_length", "entropy", "kl", "ref_beta"):
        assert name in m, name
    assert float(m["ref_beta"]) == pytest.approx(float(config.ref_kl_coef))
    assert 0.0 < float(m["entropy"]) <= math.log(V)
    data = buffer.ordered(run["state"].buffer)
    b = _responses(data, P, PAD)
    mask = np.asarray(b.mask)
    assert float(m["response_length"]) == pytest.approx(mask.sum(-1).mean())
    # reward is the verifier's, before any KL penalty; episode_return counts the same responses.
    assert float(m["reward"]) == pytest.approx(_verifier(b).mean())
    assert float(m["episode_return"]) == pytest.approx(_verifier(b).mean())
    # The reference recorded at each token of each response is the SFT run's final policy, scored
    # in one pass over the response: on a response holding no PAD (all of them: the policy cannot
    # emit it), its per-step policy on each step's buffer.
    ref_params = setup.reference.agent.params["policy"]
    valid = mask[..., None] > 0
    one_pass = np.asarray(_scored(ref_params, b.tokens).logits)
    np.testing.assert_allclose(
        np.where(valid, b.ref_dist.logits, 0), np.where(valid, one_pass, 0), rtol=1e-5, atol=1e-6
    )
    policy, _ = _token_networks()
    per_step = np.swapaxes(np.asarray(jax.jit(policy.apply)(ref_params, data.obs).logits), 0, 1)  # [N, T, V]
    np.testing.assert_allclose(np.where(valid, one_pass, 0), np.where(valid, per_step, 0), rtol=1e-5, atol=1e-6)
    # kl_ref: the exact KL(pi || pi_ref) of the updated policy at each token, summed over each
    # response, averaged over responses.
    want = _kl_ref(run["state"].agent.params["policy"], b)
    moved = max(np.max(np.abs(np.asarray(new) - np.asarray(old)))
                for new, old in zip(jax.tree.leaves(run["state"].agent.params["policy"]),
                                    jax.tree.leaves(run["start"].agent.params["policy"]), strict=True))  # fmt: skip
    if config.init_from_reference:
        # At the reference with every reward 0 (GRPO here), k3's gradient vanishes (pi = pi_ref):
        # the policy stays put, up to Adam's steps on float32 rounding (|g| ~1e-7 against its eps
        # of 1e-5: ~1e-2 of a step of lr = 3e-4), where a real gradient moves it ~lr per step.
        assert moved < 1e-4
        assert abs(float(m["kl"])) < 1e-6 and abs(float(m["kl_ref"])) < 1e-6 and abs(want) < 1e-6
    else:  # from its own initialization, pulled toward the reference
        assert moved > 1e-4
        assert float(m["kl"]) > 0 and want > 1e-3
        np.testing.assert_allclose(m["kl_ref"], want, rtol=1e-5)


def _check_reward_placement(runs, algo):
    """RLOO and PPO-LM learn from r_t - beta * k1 at each token (TRL); GRPO from the verifier's
    reward, its KL term being in the loss."""
    run, config = runs[algo], runs["made"][algo][0]
    b = jax.tree.map(np.asarray, _responses(buffer.ordered(run["state"].buffer), P, PAD))
    last = np.arange(H)[None, :] == b.mask.sum(-1, keepdims=True) - 1
    raw = np.where(last & (b.mask > 0), _verifier(b)[:, None], 0.0)
    if algo in ("rloo", "ppo-lm"):
        assert (config.ref_kl_in, config.ref_kl_estimator) == ("reward", "k1")
        k1 = np.where(b.mask > 0, b.log_prob - np.asarray(b.ref_dist.log_prob(b.action)), 0.0)
        assert np.abs(k1).max() > 1e-3  # the penalty is not vacuous
        np.testing.assert_allclose(b.reward, raw - float(config.ref_kl_coef) * k1, rtol=1e-5, atol=1e-7)
    else:
        assert config.ref_kl_in == "loss"
        np.testing.assert_array_equal(b.reward, raw)


@pytest.mark.parametrize("algo", ["grpo", "ppo-lm"])
def test_rl_algos_train_from_the_sft_reference_and_log_its_kl(rl, algo):
    _check_one_update(rl, algo)


@pytest.mark.parametrize("algo", ["grpo", "ppo-lm"])
def test_the_kl_penalty_is_in_the_reward_for_rloo_and_ppo_lm_only(rl, algo):
    _check_reward_placement(rl, algo)


@pytest.mark.slow
def test_rloo_trains_from_the_sft_reference_with_its_kl_in_the_reward(sft):
    """RLOO's own program (slow only for its compilation: the checks above, on RLOO)."""
    runs = _one_update_each(sft[1], ["rloo"])
    _check_one_update(runs, "rloo")
    _check_reward_placement(runs, "rloo")


def test_init_from_reference_starts_the_policy_at_the_sft_policy(sft, rl):
    result, _ = sft
    sft_policy = jax.tree.leaves(result.final_state.agent.params["policy"])
    for ours, theirs in zip(jax.tree.leaves(rl["grpo"]["start"].agent.params["policy"]), sft_policy, strict=True):
        np.testing.assert_array_equal(ours, theirs[0])
    # Off (PPO-LM here), the policy starts from its own initialization; the critic always does.
    fresh = jax.tree.leaves(rl["ppo-lm"]["start"].agent.params["policy"])
    assert max(np.max(np.abs(ours - theirs[0])) for ours, theirs in zip(fresh, sft_policy, strict=True)) > 1e-2
    assert set(rl["ppo-lm"]["start"].agent.params) == {"policy", "value"}


def test_online_dpo_pairs_the_best_and_worst_of_each_group(rl):
    """On rewritten rewards (`_dpo_batch`: pairs in groups 0, 1, 4, 5; ties elsewhere) and a policy
    moved away from the reference, the loss is the mean over the groups with a pair of
    -log sigmoid(beta (log-ratio of the chosen - of the rejected)), each log pi / pi_ref summed
    over the response's tokens; ties form no pair."""
    pairs = rl["dpo pairs"]
    beta = float(rl["made"]["dpo"][0].ref_kl_coef)
    m = pairs["metrics"]
    assert _finite(m)
    for name in ("kl_ref", "reward", "response_length", "entropy", "kl"):
        assert name in m, name
    b = _responses(pairs["data"], P, PAD)
    log_pi = _scored(pairs["start"].params["policy"], b.tokens).log_prob(b.action)
    per_token = np.where(np.asarray(b.mask) > 0, np.asarray(log_pi - b.ref_dist.log_prob(b.action)), 0.0)
    log_ratio = per_token.sum(-1).reshape(8, 2)
    chosen = np.array([log_ratio[0, 0], log_ratio[1, 1], log_ratio[4, 0], log_ratio[5, 1]])
    rejected = np.array([log_ratio[0, 1], log_ratio[1, 0], log_ratio[4, 1], log_ratio[5, 0]])
    h = chosen - rejected
    assert np.min(np.abs(h)) > 1e-2  # the moved policy makes every margin count
    # One epoch of one minibatch: the metrics are the loss at the moved parameters.
    assert float(m["loss"]) == pytest.approx(np.mean(np.log1p(np.exp(-beta * h))), rel=1e-5)
    assert float(m["reward_margin"]) == pytest.approx(np.mean(beta * h), rel=1e-4)
    assert float(m["reward_chosen"]) == pytest.approx(np.mean(beta * chosen), rel=1e-4)
    assert float(m["reward_rejected"]) == pytest.approx(np.mean(beta * rejected), rel=1e-4)
    assert float(m["pair_frac"]) == 0.5
    assert float(m["reward"]) == 0.5  # the verifier's mean over the 16 responses
    assert float(m["response_length"]) == pytest.approx(np.asarray(b.mask).sum(-1).mean())
    # kl_ref of the updated policy, now well away from the reference.
    want = _kl_ref(pairs["new"].params["policy"], b)
    assert want > 0.05
    np.testing.assert_allclose(m["kl_ref"], want, rtol=1e-5)


def test_online_dpo_takes_no_step_without_a_pair(rl):
    """GRPO's rollout of an untrained policy: every reward 0, every group a tie, no pair, a zero
    loss and no change to the parameters (Adam's step on a zero gradient is zero)."""
    ties = rl["dpo ties"]
    assert not np.any(np.asarray(ties["data"].reward))
    m = ties["metrics"]
    assert float(m["pair_frac"]) == 0.0 and float(m["loss"]) == 0.0
    for new, old in zip(jax.tree.leaves(ties["new"].params), jax.tree.leaves(ties["start"].params), strict=True):
        np.testing.assert_array_equal(new, old)


def test_the_sampler_and_the_scorer_agree_on_every_generated_token(rl):
    """The log-probs PPO-LM's rollout recorded token by token (TokenTransformer.__call__, which
    reads the next token's position from the count of non-PAD tokens) equal those its update
    computes in one pass at the same parameters, so the ratio starts at 1. That needs a response
    never to hold PAD: the policy gives it probability 0 (from a near-uniform initialization it
    would otherwise emit ~1 token in 14)."""
    run = rl["ppo-lm"]
    b = _responses(buffer.ordered(run["state"].buffer), P, PAD)
    mask, action = np.asarray(b.mask) > 0, np.asarray(b.action)
    scored = np.asarray(_scored(run["start"].agent.params["policy"], b.tokens).log_prob(b.action))
    assert not np.any((action == PAD) & mask)
    assert np.all(np.isfinite(np.asarray(b.log_prob)[mask]))
    np.testing.assert_allclose(scored[mask], np.asarray(b.log_prob)[mask], rtol=1e-5, atol=1e-6)


# -- the CLI refuses a token task with a control algorithm and the reverse --------------------


@pytest.mark.parametrize(
    "algo,env,message",
    [
        ("ppo", "Addition-v0", "Addition-v0 is a token task; train it with --algo sft | grpo | rloo | ppo-lm | dpo"),
        ("grpo", "CartPole-v1", "--algo grpo trains on token tasks (Addition-v0, Sort-v0), not CartPole-v1"),
        ("sft", "Acrobot-v1", "--algo sft trains on token tasks"),
    ],
)
def test_a_mismatched_algo_and_env_is_one_line_and_exit_2(tmp_path, capsys, algo, env, message):
    out = tmp_path / "never"
    assert main(["train", "--algo", algo, "--env", env, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kl-rl: error: ") and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()
    with pytest.raises(ConfigError, match="token"):
        resolve.check_task_algo(algo, env, envs.make(env))
    resolve.check_task_algo("grpo", "Sort-v0", envs.make("Sort-v0"))  # a match passes
    resolve.check_task_algo("ppo", "CartPole-v1", envs.make("CartPole-v1"))


def test_online_dpo_without_a_reference_and_a_reference_of_another_shape_are_one_line_and_exit_2(sft, tmp_path, capsys):
    """DPO's implicit reward needs pi_ref; and a policy that starts from the reference must have its shape."""
    _, folder = sft
    out = tmp_path / "never"
    tiny = ["--layers", "1", "--width", "16", "--heads", "2", "--num-envs", "16", "--total-steps", "16",
            "--eval-episodes", "16", "--out", str(out), "--no-progress"]  # fmt: skip
    cases = [
        (["--algo", "dpo", "--group-size", "2"], "needs --reference"),
        (["--algo", "grpo", "--group-size", "4", "--reference", str(folder), "--width", "32"], "another policy"),
    ]
    for flags, message in cases:
        assert main(["train", "--env", ENV, *tiny, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("kl-rl: error: ") and message in err and len(err.splitlines()) == 1, err
        assert not out.exists()
