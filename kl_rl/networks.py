"""Policy and value networks: small MLPs whose outputs are kl_rl.kl distributions.

The policy and the critic are separate networks with separate parameter trees, so TRPO and VPG
can fit the critic apart from the policy while PPO optimizes both with one optimizer.
Initialization follows the PPO implementation details (Huang et al. 2022): orthogonal weights
with gain sqrt(2) in hidden layers, 0.01 on the policy head and 1 on the value head, zero biases.
The orthogonal initializer avoids LAPACK; see `orthogonal`.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

from kl_rl import kl
from kl_rl.errors import ConfigError

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": nn.tanh,
    "relu": nn.relu,
    "elu": nn.elu,
    "gelu": nn.gelu,
}


def orthogonal(scale: float = 1.0) -> Callable[..., jax.Array]:
    """Orthogonal initializer (Saxe et al. 2014) built from matrix products only.

    Same distribution as `flax.linen.initializers.orthogonal`: the Q of a Gaussian matrix's QR
    with R's diagonal made positive. It is computed by classical Gram-Schmidt applied twice
    (stable to float32 rounding) rather than LAPACK: jaxlib's batched CPU QR, which appears when
    `vmap` runs the init of many seeds in one program, splits the batch over the thread pool
    that runs the program and can deadlock on a 2-core machine (seen with jax 0.10.2).
    """

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        n_rows, n_cols = int(np.prod(shape[:-1])), int(shape[-1])
        rows, cols = max(n_rows, n_cols), min(n_rows, n_cols)
        a = jax.random.normal(key, (rows, cols), jnp.float32)

        def column(j, q):
            v = a[:, j]
            for _ in range(2):  # "twice is enough" (Giraud et al. 2005)
                v = v - q @ (q.T @ v)
            return q.at[:, j].set(v / jnp.linalg.norm(v))

        q = jax.lax.fori_loop(0, cols, column, jnp.zeros((rows, cols), jnp.float32))
        if n_rows < n_cols:
            q = q.T
        return (scale * q).reshape(shape).astype(dtype)

    return init


class MLP(nn.Module):
    """Hidden layers with one activation, then a linear head of `out_dim` units."""

    hidden_sizes: Sequence[int]
    activation: str
    out_dim: int
    head_gain: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        for width in self.hidden_sizes:
            x = act(nn.Dense(width, kernel_init=orthogonal(np.sqrt(2.0)))(x))
        return nn.Dense(self.out_dim, kernel_init=orthogonal(self.head_gain))(x)


class GaussianHead(nn.Module):
    """Mean from an MLP; a state-independent log-std vector, as in PPO and TRPO's papers."""

    hidden_sizes: Sequence[int]
    activation: str
    action_dim: int
    init_log_std: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> kl.DiagGaussian:
        mean = MLP(self.hidden_sizes, self.activation, self.action_dim, 0.01)(x)
        log_std = self.param(
            "log_std", lambda _, shape: jnp.full(shape, self.init_log_std, jnp.float32), (self.action_dim,)
        )
        return kl.DiagGaussian(mean=mean, log_std=jnp.broadcast_to(log_std, mean.shape))


class CategoricalHead(nn.Module):
    """Logits from an MLP."""

    hidden_sizes: Sequence[int]
    activation: str
    num_actions: int

    @nn.compact
    def __call__(self, x: jax.Array) -> kl.Categorical:
        return kl.Categorical(logits=MLP(self.hidden_sizes, self.activation, self.num_actions, 0.01)(x))


class Network(NamedTuple):
    """A pure (init, apply) pair: init(key, obs) -> params; apply(params, obs) -> output."""

    init: Callable[[jax.Array, jax.Array], Any]
    apply: Callable[[Any, jax.Array], Any]


def resolve_distribution(distribution: str, action_space: gym.Space) -> str:
    """Maps "auto" to the distribution that fits the action space and checks the fit."""
    discrete = isinstance(action_space, gym.spaces.Discrete)
    if distribution == "auto":
        return "categorical" if discrete else "gaussian"
    if distribution == "categorical" and not discrete:
        raise ConfigError(
            f"distribution 'categorical' needs a discrete action space, but this env's is {action_space}; "
            "use --distribution gaussian (or auto)"
        )
    if distribution == "gaussian" and not isinstance(action_space, gym.spaces.Box):
        raise ConfigError(
            f"distribution 'gaussian' needs a Box action space, but this env's is {action_space}; "
            "use --distribution categorical (or auto)"
        )
    if distribution not in ("categorical", "gaussian"):
        raise ConfigError(f"unknown distribution {distribution!r}; use auto, categorical or gaussian")
    return distribution


def make_policy(
    action_space: gym.Space,
    hidden_sizes: Sequence[int],
    activation: str,
    distribution: str = "auto",
    init_log_std: Any = 0.0,
) -> Network:
    """The policy network: observation -> distribution over actions."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}")
    if resolve_distribution(distribution, action_space) == "categorical":
        module = CategoricalHead(tuple(hidden_sizes), activation, int(action_space.n))
    else:
        module = GaussianHead(tuple(hidden_sizes), activation, int(np.prod(action_space.shape)), init_log_std)
    return Network(init=module.init, apply=module.apply)


def make_value(hidden_sizes: Sequence[int], activation: str) -> Network:
    """The critic: observation -> scalar value (the trailing unit axis is squeezed)."""
    module = MLP(tuple(hidden_sizes), activation, 1, 1.0)
    return Network(init=module.init, apply=lambda params, obs: module.apply(params, obs)[..., 0])
