"""A frozen reference with a carried state, and a recurrent policy on a reference's leash.

The collector carries a recurrent reference's state beside the policy's and resets it where the
policy's is reset, so the recorded `ref_dist` is what the reference gives along the episode; the
reference's KL after an update (`kl_ref`) replays the recurrent policy along the rollout as the
update does.
"""

import csv
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_checks import stop_midway

import kl_rl
from kl_rl import envs, kl, networks, runfolder, sources, train
from kl_rl.agents.common import actor_critic
from kl_rl.agents.ppo import PPOConfig
from kl_rl.cli import main

pytestmark = pytest.mark.xdist_group("test_recurrent_reference")

ENV = "CartPoleNoVel-v1"
SMALL = {"num_envs": 4, "num_steps": 64, "update_epochs": 2, "num_minibatches": 2}


@pytest.fixture(scope="module")
def gru_teacher(tmp_path_factory):
    """A GRU PPO run folder of one seed, two updates in: a recurrent reference policy."""
    out = tmp_path_factory.mktemp("gru_teacher") / "run"
    kl_rl.run("ppo", ENV, seeds=1, total_steps=2 * 4 * 64, network="gru", normalize_obs=False, **SMALL).save(out)
    return out


def _swap(tree):
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), tree)


def _sharp(params):
    """Random policy weights in place of the teacher's: a fresh policy head (gain 0.01) gives
    nearly the same distribution whatever the state, these make it depend on the state."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    return jax.tree.unflatten(treedef, [0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)])


def _updates(config, num_updates=1, **given):
    """Seed 0 with the given reference (and init_from), both with `_sharp` policy weights: the
    setup, and the train state and metrics after each of `num_updates` updates."""
    resolved = sources.resolve_sources("ppo", ENV, config, **given)
    trainer = train.make_trainer("ppo", config, envs.make(ENV), resolved.reference)
    setup = jax.tree.map(lambda x: x[0], resolved.setup([0]))
    ref = setup.reference.agent
    policy = _sharp(ref.params["policy"])
    ref = ref.replace(params={**ref.params, "policy": policy})
    setup = setup._replace(reference=setup.reference.replace(agent=ref))
    if setup.start is not None:
        setup = setup._replace(start=setup.start.replace(params={**setup.start.params, "policy": policy}))
    run = jax.jit(lambda s: trainer.run(s, config, 1))
    state, out = trainer.init(jax.random.key(0), config, setup), []
    for _ in range(num_updates):
        state, metrics = run(state)
        out.append((state, metrics))
    return trainer, setup, out


def test_a_recurrent_reference_acts_as_the_same_policy_would_along_the_episodes(gru_teacher):
    # The student starts from the teacher's parameters, so the first rollout's behaviour policy
    # is the reference itself: its recorded distributions are the student's only if the
    # reference's state was carried from step to step and reset where the student's was.
    config = PPOConfig(total_steps=4 * 64, network="gru", ref_kl_coef=0.1, **SMALL)
    _, _, [(state, _)] = _updates(config, reference=gru_teacher, init_from=gru_teacher)
    data = state.buffer.data
    assert np.asarray(data.start)[1:].sum() >= 3  # episodes end inside the rollout
    np.testing.assert_allclose(data.ref_dist.logits, data.dist.logits, rtol=1e-6, atol=1e-6)


def test_kl_ref_of_a_recurrent_policy_is_its_exact_kl_along_the_rollout(gru_teacher):
    config = PPOConfig(total_steps=4 * 64, network="gru", ref_kl_coef=0.1, **SMALL)
    trainer, _, [(state, metrics)] = _updates(config, reference=gru_teacher)
    data = state.buffer.data
    ac = actor_critic(config, trainer.vec_env.observation_space, trainer.vec_env.action_space)
    # The update's own unroll of the updated policy (env-major, reset where `start` says).
    dist = ac.distribution(state.agent.params["policy"], _swap(data))
    want = jnp.mean(kl.kl_divergence(dist, _swap(data.ref_dist)))
    np.testing.assert_allclose(metrics["kl_ref"], want, rtol=1e-5)
    assert want > 0.1  # a freshly initialized student is far from the sharp teacher


def test_a_recurrent_reference_of_a_stateless_student_is_carried_across_rollouts(gru_teacher):
    # An MLP student records no states; the reference's recorded distributions are the teacher
    # unrolled along the raw observations of both rollouts, reset after each ended episode.
    config = PPOConfig(total_steps=2 * 4 * 64, ref_kl_coef=0.1, **SMALL)
    _, setup, updates = _updates(config, num_updates=2, reference=gru_teacher)
    data = [s.buffer.data for s, _ in updates]
    assert data[0].start is None and data[0].policy_state is None
    obs = jnp.concatenate([d.obs for d in data])
    done = jnp.concatenate([d.terminated | d.truncated for d in data])
    start = jnp.concatenate([jnp.ones_like(done[:1]), done[:-1]])
    loaded = runfolder.load(gru_teacher)
    teacher = actor_critic(loaded.config, loaded.trainer.vec_env.observation_space, loaded.trainer.vec_env.action_space)
    params = setup.reference.agent.params["policy"]
    num_envs = SMALL["num_envs"]
    want = networks.unroll(teacher.policy_net, params, teacher.initial_state(num_envs), _swap(obs), _swap(start))
    got = jnp.concatenate([d.ref_dist.logits for d in data])
    assert np.asarray(start)[1:].sum() >= 6
    np.testing.assert_allclose(got, _swap(want.logits), rtol=1e-5, atol=1e-6)


def _rows(path):
    with open(path / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_a_recurrent_run_on_a_recurrent_reference_resumes_bit_identically(gru_teacher, tmp_path, monkeypatch, capsys):
    # The reference's carried state is part of the collector, so of the checkpoint.
    monkeypatch.setenv("KL_RL_CACHE_DIR", str(tmp_path / "cache"))
    args = ["train", "--algo", "ppo", "--env", ENV, "--network", "gru", "--seeds", "2", "--total-steps", "2048"]
    args += ["--no-progress", "--checkpoint-every", "2", "--reference", str(gru_teacher), "--ref-kl-coef", "0.2"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*args, "--out", str(whole)]) == 0
    stop_midway(monkeypatch, [*args, "--out", str(cut)])
    capsys.readouterr()
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
    resumed_at = int(re.search(r"from update (\d+) of 8", capsys.readouterr().out).group(1))
    assert 0 < resumed_at < 8
    rows = _rows(whole)
    assert len(rows) == 2 * 8
    assert all(float(r["kl_ref"]) > 0 and np.float32(r["ref_beta"]) == np.float32(0.2) for r in rows)
    assert _rows(cut) == rows
