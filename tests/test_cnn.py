"""Image encoders (`--network cnn`): MinAtar's conv torso, the unflattened gymnax images it reads,
a PPO update through it, and the one-line refusals where it cannot work."""

import importlib.util

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kl_rl import envs, networks, train
from kl_rl.agents import ALGOS
from kl_rl.agents.ppo import PPOConfig
from kl_rl.errors import ConfigError
from kl_rl.resolve import resolve_config

needs_gymnax = pytest.mark.skipif(importlib.util.find_spec("gymnax") is None, reason="gymnax extra not installed")
BREAKOUT = "gymnax/Breakout-MinAtar"


def _conv_by_hand(obs: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """A VALID, stride-1 cross-correlation [B, H, W, C] -> [B, H-k+1, W-k+1, F], ReLU, flattened
    in (row, column, channel) order: what MinAtar's torso computes, written with loops."""
    k = kernel.shape[0]
    b, h, w, _ = obs.shape
    out = np.zeros((b, h - k + 1, w - k + 1, kernel.shape[-1]))
    for i in range(h - k + 1):
        for j in range(w - k + 1):
            out[:, i, j] = np.einsum("bxyc,xycf->bf", obs[:, i : i + k, j : j + k], kernel) + bias
    return np.maximum(out, 0.0).reshape(b, -1)


def test_the_conv_torso_is_minatars_layer_computed_by_hand():
    obs = np.asarray(jax.random.bernoulli(jax.random.key(0), 0.3, (3, 10, 10, 4)), np.float32)
    torso = networks.ConvTorso()
    params = torso.init(jax.random.key(1), obs)
    conv = params["params"]
    assert conv["kernel"].shape == (3, 3, 4, 16) and conv["bias"].shape == (16,)
    # A nonzero bias, so that the ReLU and the bias both show.
    conv["bias"] = 0.1 * jax.random.normal(jax.random.key(2), (16,))
    features = np.asarray(torso.apply(params, obs))
    assert features.shape == (3, 8 * 8 * 16)
    expected = _conv_by_hand(obs.astype(np.float64), np.asarray(conv["kernel"], np.float64), np.asarray(conv["bias"]))
    np.testing.assert_allclose(features, expected, atol=1e-5)
    assert 0 < np.mean(features == 0) < 1  # some units are cut by the ReLU, not all


def test_cnn_policy_and_value_take_any_leading_batch_axes():
    obs = jnp.ones((2, 5, 10, 10, 6))  # [N, T, H, W, C], as the buffer holds them
    policy = networks.make_policy(gym.spaces.Discrete(6), (8,), "relu", network="cnn")
    value = networks.make_value((8,), "relu", "cnn")
    pp, vp = policy.init(jax.random.key(0), obs[0]), value.init(jax.random.key(1), obs[0])
    assert policy.apply(pp, obs).logits.shape == (2, 5, 6)
    assert value.apply(vp, obs).shape == (2, 5)
    assert value.apply(vp, obs[0, 0]).shape == ()
    # Separate nets: each has its own torso, then the dense layer on the 1024 features.
    for params in (pp, vp):
        leaves = {"/".join(str(k.key) for k in path): x.shape for path, x in jax.tree.leaves_with_path(params)}
        assert leaves["params/ConvTorso_0/kernel"] == (3, 3, 6, 16)
        assert (1024, 8) in leaves.values()


@needs_gymnax
def test_a_conv_net_gets_the_images_the_mlp_gets_flattened():
    flat = envs.make(BREAKOUT)
    images = envs.with_images(flat)
    assert flat.observation_space.shape == (400,) and images.observation_space.shape == (10, 10, 4)
    key = jax.random.key(0)
    _, obs_flat = flat.reset(key, flat.default_params)
    _, obs_img = images.reset(key, images.default_params)
    np.testing.assert_array_equal(np.asarray(obs_img).reshape(-1), np.asarray(obs_flat))
    assert np.asarray(obs_img).any()


@needs_gymnax
def test_a_tiny_ppo_update_runs_with_a_cnn_on_breakout_minatar():
    config = PPOConfig(total_steps=2 * 4 * 8, num_envs=4, num_steps=8, num_minibatches=2, update_epochs=1,
                       network="cnn", hidden_sizes=(16,), activation="relu", eval_episodes=2)  # fmt: skip
    trainer = train.make_trainer("ppo", config, envs.make(BREAKOUT))
    assert trainer.vec_env.observation_space.shape == (10, 10, 4)
    out = jax.jit(trainer.train)(jax.random.key(0))
    assert out.state.buffer.data.obs.shape[-3:] == (10, 10, 4)
    kl = np.asarray(out.metrics["kl"])
    assert kl.shape == (2,) and np.all(np.isfinite(kl)) and np.all(kl > 0)  # the policy moved
    for net in ("policy", "value"):
        assert out.state.agent.params[net]["params"]["ConvTorso_0"]["kernel"].shape == (3, 3, 4, 16)
    assert out.eval_returns.shape == (2,) and np.all(np.isfinite(np.asarray(out.eval_returns)))


@pytest.mark.parametrize("env_id", ["CartPole-v1", pytest.param("gymnax/CartPole-v1", marks=needs_gymnax)])
def test_a_cnn_on_a_non_image_env_is_refused_in_one_line(env_id):
    for build in (lambda: resolve_config("ppo", env_id, overrides=dict(network="cnn")),
                  lambda: train.make_trainer("ppo", PPOConfig(network="cnn"), envs.make(env_id))):  # fmt: skip
        with pytest.raises(ConfigError, match="needs image observations") as excinfo:
            build()
        assert "\n" not in str(excinfo.value) and excinfo.value.fields == ("network",)


@pytest.mark.parametrize("algo", ["cem", "mpo"])
def test_agents_without_an_actor_critic_refuse_a_cnn(algo):
    with pytest.raises(ConfigError, match="is for the actor-critic agents") as excinfo:
        ALGOS[algo].config(network="cnn").validate(gym.spaces.Discrete(3))
    assert "\n" not in str(excinfo.value)


def test_a_cnn_takes_no_reference_yet():
    from kl_rl.reference import RefSpec

    with pytest.raises(ConfigError, match="takes no --reference"):
        train.make_trainer("ppo", PPOConfig(network="cnn"), envs.make("CartPole-v1"), RefSpec("ppo", PPOConfig()))
