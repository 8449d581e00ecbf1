"""The reference and behaviour anchors through the one loop: what each option records and changes.

The estimators, V-trace and the effective sample size are tested as functions in test_kl.py and
test_returns.py; here they are tested where the training loop uses them.
"""

import csv
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_checks import stop_midway

import kl_rl
from kl_rl import envs, kl, runfolder, sources
from kl_rl.agents import PPOConfig
from kl_rl.agents.common import add_reference_loss
from kl_rl.cli import main
from kl_rl.train import make_trainer

# Module-scoped fixtures: the whole file runs on one pytest-xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_anchors")

SMALL = {"num_envs": 4, "num_steps": 64, "update_epochs": 2, "num_minibatches": 2}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A PPO CartPole run folder of 2 seeds, partly trained: the reference policy."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    kl_rl.run("ppo", "CartPole-v1", seeds=2, total_steps=8192, **SMALL).save(out)
    return out


def _rows(path):
    with open(path / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_a_reference_is_recorded_and_each_seed_learns_against_its_own(teacher, tmp_path):
    result = kl_rl.run("ppo", "CartPole-v1", seeds=3, reference=teacher, total_steps=2048, ref_kl_coef=0.0, **SMALL)
    loaded = runfolder.load(teacher)
    # Seed s holds the reference's seed s mod 2, parameters and normalizer both.
    ref = result.final_state.anchors.reference
    for s, t in enumerate([0, 1, 0]):
        for ours, theirs in zip(_leaves(ref.agent), _leaves(loaded.state.agent), strict=True):
            np.testing.assert_array_equal(ours[s], theirs[t])
    record = result.sources["reference"]
    assert record["run"] == str(teacher.absolute()) and record["update"] == loaded.update
    assert record["params_sha256"] == sources.params_sha256((loaded.state.agent, loaded.state.collector.obs_norm))
    # kl_ref is logged at coefficient 0, and it is the exact mean KL(pi || pi_ref) of the batch.
    assert np.all(result.metrics["ref_beta"] == 0.0)
    assert np.all(np.isfinite(result.metrics["kl_ref"])) and np.all(result.metrics["kl_ref"] > 0)
    out = result.save(tmp_path / "student")
    assert json.loads((out / "config.json").read_text())["reference"] == record
    assert json.loads((out / "summary.json").read_text())["reference"] == record


def test_kl_ref_is_the_exact_kl_of_the_updated_policy_on_the_batch(teacher):
    config = PPOConfig(total_steps=512, ref_kl_coef=0.1, **SMALL)
    anchors = sources.resolve_sources("ppo", "CartPole-v1", config, reference=teacher)
    trainer = make_trainer("ppo", config, envs.make("CartPole-v1"), anchors.reference)
    setup = jax.tree.map(lambda x: x[0], anchors.setup([0]))
    state, metrics = jax.jit(lambda s: trainer.run(s, config, 1))(trainer.init(jax.random.key(0), config, setup))
    data = state.buffer.data
    agent = kl_rl.agents.ALGOS["ppo"].make(config, trainer.vec_env.observation_space, trainer.vec_env.action_space)
    want = jnp.mean(kl.kl_divergence(agent.policy(state.agent, data.obs), data.ref_dist))
    np.testing.assert_allclose(metrics["kl_ref"][0], want, rtol=1e-5)
    # The recorded reference distribution is the teacher's policy on the raw observation,
    # through the teacher's own normalizer (this student does not normalize).
    loaded = runfolder.load(teacher)
    raw = data.obs[:3, 0]
    np.testing.assert_allclose(data.ref_dist.logits[:3, 0], loaded.dist(raw, seed=0).logits, rtol=1e-5, atol=1e-6)


def test_the_loss_penalty_is_beta_times_the_exact_kl_in_the_configured_direction():
    # `add_reference_loss` is what every agent's loss calls; the anchor functions' own directions
    # are tested in test_kl.py, the direction the loss hands them here.
    rng = np.random.default_rng(0)
    pi, ref = (kl.Categorical(jnp.asarray(2.0 * rng.normal(size=(6, 3)), jnp.float32)) for _ in range(2))
    fields = dict.fromkeys(kl_rl.buffer.Transition._fields)
    traj = kl_rl.buffer.Transition(**{**fields, "action": jnp.zeros(6, jnp.int32), "ref_dist": ref})
    reverse, forward = jnp.mean(kl.kl_divergence(pi, ref)), jnp.mean(kl.kl_divergence(ref, pi))
    assert abs(reverse - forward) > 0.01  # the directions differ (0.44 and 0.41 nats)
    for direction, want in (("reverse", reverse), ("forward", forward)):
        got = add_reference_loss(jnp.float32(1.0), PPOConfig(ref_kl_direction=direction), pi, traj, 0.5)
        np.testing.assert_allclose(got, 1.0 + 0.5 * want, rtol=1e-6, err_msg=direction)


def test_a_reward_penalty_is_beta_times_the_estimate_at_the_behaviour_sample(teacher):
    config = PPOConfig(total_steps=512, ref_kl_coef=0.25, ref_kl_in="reward", ref_kl_estimator="k1", **SMALL)
    anchors = sources.resolve_sources("ppo", "CartPole-v1", config, reference=teacher)
    trainer = make_trainer("ppo", config, envs.make("CartPole-v1"), anchors.reference)
    setup = jax.tree.map(lambda x: x[0], anchors.setup([0]))
    state, _ = jax.jit(lambda s: trainer.run(s, config, 1))(trainer.init(jax.random.key(0), config, setup))
    data = state.buffer.data
    # CartPole pays 1 per step; the stored reward is 1 - beta (log pi(a) - log pi_ref(a)).
    k1 = data.log_prob - data.ref_dist.log_prob(data.action)
    np.testing.assert_allclose(data.reward, 1.0 - 0.25 * k1, rtol=1e-6, atol=1e-6)
    assert np.abs(k1).max() > 0.1  # the penalty is not vacuous


@pytest.mark.parametrize(
    "placement", [{}, pytest.param({"ref_kl_in": "reward", "ref_kl_estimator": "k3"}, marks=pytest.mark.slow)]
)
def test_kl_ref_falls_as_the_coefficient_rises(teacher, placement):
    """Median over 8 seeds of the final kl_ref, at three coefficients, strictly decreasing."""
    from kl_rl import sweep

    grid = {"ref_kl_coef": [0.0, 0.3, 3.0]}
    result = sweep.run_sweep(
        "ppo", "CartPole-v1", grid, seeds=8, overrides={"total_steps": 4096, **SMALL, **placement}, reference=teacher
    )
    final = np.median(np.nanmean(result.metrics["kl_ref"][:, :, -5:], axis=2), axis=1)
    assert final[0] > final[1] > final[2], final


def test_policy_lag_acts_with_the_parameters_of_lag_updates_ago():
    config = PPOConfig(total_steps=64 * 4 * 6, policy_lag=2, **SMALL)
    trainer = make_trainer("ppo", config, envs.make("CartPole-v1"))
    step = jax.jit(lambda s: trainer.run(s, config, 1))
    states = [trainer.init(jax.random.key(0), config)]
    metrics = []
    for _ in range(5):
        state, m = step(states[-1])
        states.append(state)
        metrics.append(m)
    agent = kl_rl.agents.ALGOS["ppo"].make(config, trainer.vec_env.observation_space, trainer.vec_env.action_space)
    # Update u (0-based) acts with the state after max(u - 2, 0) updates.
    for u, behaviour in [(0, 0), (1, 0), (2, 0), (3, 1), (4, 2)]:
        data = states[u + 1].buffer.data
        dist = agent.policy(states[behaviour].agent, data.obs)
        np.testing.assert_allclose(dist.log_prob(data.action), data.log_prob, rtol=1e-5, atol=1e-5)
        if behaviour != u:
            other = agent.policy(states[u].agent, data.obs)
            assert np.abs(other.log_prob(data.action) - data.log_prob).max() > 1e-4
    # At update 0 the behaviour policy is the current one: every importance weight is 1.
    np.testing.assert_allclose(metrics[0]["ess"][0], 1.0, atol=1e-6)
    assert 0.0 < metrics[4]["ess"][0] < 1.0
    # Behaviour KL is measured from the lagged policy, the previous-iterate `kl` from the proximal.
    assert metrics[4]["kl_behaviour"][0] > metrics[4]["kl"][0] > 0


def test_replay_keeps_the_last_k_rollouts_and_the_first_fills_the_rest():
    config = PPOConfig(total_steps=64 * 4 * 3, replay_rollouts=3, **SMALL)
    trainer = make_trainer("ppo", config, envs.make("CartPole-v1"))
    step = jax.jit(lambda s: trainer.run(s, config, 1))
    s1, _ = step(trainer.init(jax.random.key(0), config))
    s2, m2 = step(s1)
    assert s1.buffer.data.obs.shape[0] == 3 * 64
    first = s1.buffer.data.obs[:64]
    for k in range(3):
        np.testing.assert_array_equal(s1.buffer.data.obs[64 * k : 64 * (k + 1)], first)
    ordered = kl_rl.buffer.ordered(s2.buffer).obs
    np.testing.assert_array_equal(ordered[:128], np.concatenate([first, first]))
    assert not np.array_equal(ordered[128:], first)  # the newest rollout is the second one
    assert 0.0 < m2["ess"][0] < 1.0  # the first rollout's behaviour policy is one update old


@pytest.mark.slow
def test_corrected_stale_runs_learn_cartpole():
    """Lagged actors and replay with the corrections still solve CartPole at PureJaxRL's budget."""
    for overrides in ({"policy_lag": 2}, {"replay_rollouts": 2, "behaviour_kl_coef": 0.5}):
        result = kl_rl.run("ppo", "CartPole-v1", seeds=4, **overrides)
        assert result.diverged == [None] * 4, overrides
        assert np.median(result.final_returns) > 400, (overrides, result.final_returns)


def test_init_from_starts_from_the_runs_parameters_and_normalizer(teacher):
    config = PPOConfig(total_steps=512, **SMALL)
    anchors = sources.resolve_sources("ppo", "CartPole-v1", config, init_from=teacher)
    trainer = make_trainer("ppo", config, envs.make("CartPole-v1"), anchors.reference)
    loaded = runfolder.load(teacher)
    setup = anchors.setup([0, 1, 2])
    for i, t in enumerate([0, 1, 0]):
        state = trainer.init(jax.random.key(i), config, jax.tree.map(lambda x, i=i: x[i], setup))
        for ours, theirs in zip(_leaves(state.agent.params), _leaves(loaded.state.agent.params), strict=True):
            np.testing.assert_array_equal(ours, theirs[t])
        # Adam starts afresh: its moments are zeros.
        assert all(np.all(x == 0) for x in _leaves(state.agent.opt_state) if x.dtype == np.float32)
    # Through the runner: a vanishing learning rate leaves each seed at its source's parameters.
    result = kl_rl.run("ppo", "CartPole-v1", seeds=3, init_from=teacher, total_steps=256, lr=1e-12, **SMALL)
    ours_all, theirs_all = _leaves(result.final_state.agent.params), _leaves(loaded.state.agent.params)
    for s, t in enumerate([0, 1, 0]):
        for ours, theirs in zip(ours_all, theirs_all, strict=True):
            np.testing.assert_allclose(ours[s], theirs[t], atol=1e-6)
    assert result.sources["init_from"]["params_sha256"]


@pytest.mark.parametrize(
    "algo,flags",
    [
        ("trpo", ["--vf-minibatches", "4"]),
        ("vpg", ["--num-envs", "4", "--vf-epochs", "2", "--ref-kl-in", "reward", "--ref-kl-estimator", "k2"]),
        ("cem", ["--population-size", "8"]),
    ],
)
def test_vpg_trpo_and_cem_take_a_reference(teacher, tmp_path, algo, flags):
    steps = ["--iterations", "3"] if algo == "cem" else ["--total-steps", "2048", "--num-steps", "128"]
    out = tmp_path / algo
    args = ["train", "--algo", algo, "--reference", str(teacher), "--ref-kl-coef", "0.5", "--out", str(out)]
    assert main([*args, "--no-progress", "--seeds", "2", *steps, *flags]) == 0
    rows = _rows(out)
    assert all(float(r["kl_ref"]) >= 0 and float(r["ref_beta"]) == 0.5 for r in rows)
    if algo == "cem":
        assert all(float(r["member_kl_ref"]) > 0 for r in rows)


def test_a_resumed_run_keeps_its_reference_even_when_the_folder_is_gone(teacher, tmp_path, monkeypatch):
    # The three runs share their programs through the program cache: one compilation.
    monkeypatch.setenv("KL_RL_CACHE_DIR", str(tmp_path / "cache"))
    reference = tmp_path / "reference"
    shutil.copytree(teacher, reference)
    args = ["train", "--algo", "ppo", "--seeds", "2", "--total-steps", "4096", "--no-progress"]
    args += ["--checkpoint-every", "2"]
    args += ["--reference", str(reference), "--ref-kl-coef", "0.2", "--ref-kl-control", "adaptive"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*args, "--out", str(whole)]) == 0
    stop_midway(monkeypatch, [*args, "--out", str(cut)])
    # The reference folder is gone: the resumed run takes its reference from the checkpoint.
    shutil.rmtree(reference)
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
    assert _rows(cut) == _rows(whole)
    saved = json.loads((cut / "summary.json").read_text())["reference"]
    assert saved == json.loads((whole / "summary.json").read_text())["reference"]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--reference", "{missing}"], "does not exist"),
        (["--env", "Acrobot-v1", "--reference", "{teacher}"], "is a run on CartPole-v1, not Acrobot-v1"),
        (["--reference", "{teacher}", "--reference-seed", "7"], "is not a seed of"),
        (["--ref-kl-coef", "0.1"], "give it with --reference"),
        (["--reference-seed", "0"], "--reference-seed needs --reference"),
        (["--reference", "{teacher}", "--ref-kl-estimator", "k2", "--ref-kl-direction", "forward"], "reverse KL only"),
        (["--algo", "cem", "--reference", "{teacher}", "--ref-kl-in", "reward"], "leave --ref-kl-in loss"),
        (["--init-from", "{teacher}", "--hidden-sizes", "32"], "networks of other shapes"),
        (["--algo", "cem", "--init-from", "{teacher}"], "cannot"),
        (["--algo", "trpo", "--policy-lag", "1"], "unknown hyperparameter 'policy_lag'"),
        (["--replay-rollouts", "0"], "--replay-rollouts must be a positive integer"),
    ],
)
def test_bad_anchor_input_is_one_line_and_exit_2(teacher, tmp_path, capsys, flags, message):
    out = tmp_path / "never"
    flags = [f.format(teacher=teacher, missing=tmp_path / "missing") for f in flags]
    assert main(["train", *flags, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()
