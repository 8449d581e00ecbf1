"""What PPO, VPG and TRPO share: the same loop, the same buffer, and a policy that improves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kl_rl import envs

from .common import bandit_batch, made_agent, train

# made_agent's compiled updates are shared by the tests of this file: it runs on one xdist worker.
pytestmark = pytest.mark.xdist_group("test_actor_critic")

SMALL = {
    "ppo": dict(total_steps=2048, num_envs=4, num_steps=64, update_epochs=2),
    "vpg": dict(total_steps=2048, num_envs=4, num_steps=64, lr=1e-2, vf_epochs=2, vf_minibatches=2),
    "trpo": dict(total_steps=2048, num_envs=4, num_steps=64, vf_epochs=2, vf_minibatches=2),
}


@pytest.mark.parametrize("algo", sorted(SMALL))
def test_a_step_on_a_bandit_raises_the_paying_actions_probability(algo):
    _, agent, update = made_agent(algo, **SMALL[algo])
    state = agent.init(jax.random.key(0))
    traj = bandit_batch(agent, state)
    new_state, metrics = update(jax.random.key(1), state, traj, jnp.zeros(()))
    p_before = agent.policy(state, traj.obs[0, :1]).probs[0, 0]
    p_after = agent.policy(new_state, traj.obs[0, :1]).probs[0, 0]
    assert p_after > p_before + 1e-4, (p_before, p_after)
    # metrics["kl"] is the exact KL(old || new) over the batch, old being the behaviour policy.
    new_dist = agent.policy(new_state, traj.obs[0])
    dist0 = jax.tree.map(lambda x: x[0], traj.dist)
    expected = float(jnp.mean(jnp.sum(dist0.probs * (dist0.log_probs - new_dist.log_probs), -1)))
    np.testing.assert_allclose(metrics["kl"], expected, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("algo", sorted(SMALL))
def test_normalized_advantages_make_the_policy_step_blind_to_a_reward_shift(algo):
    # On the bandit's one-step episodes a constant added to every reward is added to every
    # advantage, which normalization takes away again: the policy's step is unchanged. Without
    # normalization it changes, provided the shift's gradient, the sum of grad log pi(a), is
    # neither zero nor parallel to the advantages' gradient: actions unbalanced (action 1 in 1 of
    # 4) and observations that differ (on one state every policy gradient of a two-action softmax
    # lies along one direction, which TRPO's step, fixed in length by delta, cannot tell apart).
    # PPO's global-norm clip is lifted: the critic's gradient, which the shift does change, would
    # otherwise rescale the policy's.
    steps = {}
    for normalize in (True, False):
        fields = dict(SMALL[algo])
        if not normalize:
            fields["normalize_advantages"] = False
        if algo == "ppo":
            fields["max_grad_norm"] = 1e9
        _, agent, update = made_agent(algo, **fields)
        state = agent.init(jax.random.key(0))
        traj = bandit_batch(agent, state, every=4, obs=jax.random.normal(jax.random.key(4), (1, 64, 4)))
        steps[normalize] = [
            jax.tree.leaves(update(jax.random.key(1), state, t, jnp.zeros(()))[0].params["policy"])
            for t in (traj, traj._replace(reward=traj.reward + 5.0))
        ]
    for a, b in zip(*steps[True], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert max(np.max(np.abs(a - b)) for a, b in zip(*steps[False], strict=True)) > 1e-3


@pytest.mark.parametrize("algo", ["vpg", "trpo"])
def test_seeds_run_under_vmap_with_finite_metrics(algo):
    out = train(algo, seeds=2, **SMALL[algo])
    updates = 2048 // 256
    for name in ("kl", "entropy", "vf_loss", "explained_variance"):
        assert out.metrics[name].shape == (2, updates), name
        assert np.all(np.isfinite(out.metrics[name])), name
    assert not np.array_equal(out.metrics["entropy"][0], out.metrics["entropy"][1])
    assert out.eval_returns.shape == (2, 16)


@pytest.mark.slow  # long; slow-marked to keep the default run under 10 minutes (issue 16)
def test_one_seed_runs_unbatched_and_its_checkpointed_segments_agree(tmp_path):
    """A single seed skips the size-1 vmap (`train.vmap_seeds`), on both of the runner's paths."""
    import kl_rl
    from kl_rl.train import make_train

    fields = dict(SMALL["ppo"], total_steps=1536)
    whole = kl_rl.run("ppo", "CartPole-v1", seeds=1, **fields)
    segmented = kl_rl.run(
        "ppo", "CartPole-v1", seeds=1, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2, **fields
    )
    config = whole.config  # the preset's, with `fields` over it
    alone = jax.jit(make_train("ppo", config, envs.make("CartPole-v1")))(jax.random.key(0), config)
    assert whole.eval_returns.shape == (1, 16) and whole.metrics["kl"].shape == (1, 6)
    for run in (whole, segmented):
        np.testing.assert_array_equal(run.eval_returns[0], alone.eval_returns)
        np.testing.assert_array_equal(run.metrics["kl"][0], alone.metrics["kl"])
        for x, y in zip(jax.tree.leaves(run.final_state.agent), jax.tree.leaves(alone.state.agent), strict=True):
            np.testing.assert_array_equal(x[0], y)


def test_vmap_seeds_refuses_axes_other_than_the_leading_one():
    from kl_rl.train import vmap_seeds

    with pytest.raises(ValueError, match="in_axes entries must be 0 or None"):
        vmap_seeds(lambda x, y: x + y, in_axes=(0, 1))
    double = vmap_seeds(lambda x, y: x * y, in_axes=(0, None))
    np.testing.assert_array_equal(double(np.ones((1, 3)), 2.0), np.full((1, 3), 2.0))  # one seed, unbatched
    np.testing.assert_array_equal(double(np.ones((2, 3)), 2.0), np.full((2, 3), 2.0))
