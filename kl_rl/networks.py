"""Policy and value networks: small MLPs whose outputs are kl_rl.distributions.

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

from kl_rl.distributions import Categorical, DiagGaussian, categorical
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
    def __call__(self, x: jax.Array) -> DiagGaussian:
        mean = MLP(self.hidden_sizes, self.activation, self.action_dim, 0.01)(x)
        log_std = self.param(
            "log_std", lambda _, shape: jnp.full(shape, self.init_log_std, jnp.float32), (self.action_dim,)
        )
        return DiagGaussian(mean=mean, log_std=jnp.broadcast_to(log_std, mean.shape))


class CategoricalHead(nn.Module):
    """Logits from an MLP."""

    hidden_sizes: Sequence[int]
    activation: str
    num_actions: int

    @nn.compact
    def __call__(self, x: jax.Array) -> Categorical:
        return Categorical(logits=MLP(self.hidden_sizes, self.activation, self.num_actions, 0.01)(x))


class Network(NamedTuple):
    """A pure (init, apply) pair: init(key, obs) -> params; apply(params, obs) -> output.

    A token transformer also has `sequence(params, tokens [..., L]) -> output at every position
    [..., L, ...]`: by causality, position i's output is what `apply` gives for the buffer whose
    last token is at i, so one pass scores a whole response.

    A network with a carried state (a recurrent cell) has `initial_state(batch) -> state` (zeros,
    leaves [batch, ...]) and `apply(params, obs, state) -> (output, state)`; `initial_state` is
    None for a network without one, whose apply is (params, obs) -> output.
    """

    init: Callable[[jax.Array, jax.Array], Any]
    apply: Callable[..., Any]
    sequence: Callable[[Any, jax.Array], Any] | None = None
    initial_state: Callable[[int], Any] | None = None


def resolve_distribution(distribution: str, action_space: gym.Space) -> str:
    """Maps "auto" to the distribution that fits the action space and checks the fit."""
    discrete = isinstance(action_space, gym.spaces.Discrete)
    if distribution == "auto":
        return "categorical" if discrete else "gaussian"
    if distribution == "categorical" and not discrete:
        raise ConfigError(
            f"distribution 'categorical' needs a discrete action space, but this env's is {action_space}; "
            "use {distribution} gaussian (or auto)",
            "distribution",
        )
    if distribution == "gaussian" and not isinstance(action_space, gym.spaces.Box):
        raise ConfigError(
            f"distribution 'gaussian' needs a Box action space, but this env's is {action_space}; "
            "use {distribution} categorical (or auto)",
            "distribution",
        )
    if distribution not in ("categorical", "gaussian"):
        raise ConfigError(f"unknown distribution {distribution!r}; use auto, categorical or gaussian")
    return distribution


NETWORKS = ("mlp", "gru", "lstm", "cnn")
"""Policy networks: mlp (a function of the observation), a recurrent cell (gru, lstm) whose
state the collector carries from step to step (`kl_rl.rollout`), or cnn (MinAtar's conv torso
in front of the MLP, for image observations [H, W, C])."""
RECURRENT = ("gru", "lstm")
"""The networks that carry a state."""


class ConvTorso(nn.Module):
    """MinAtar's conv torso (Young & Tian 2019, arXiv 1903.03176, sec. 4; the MinAtar repo's
    examples/dqn.py and AC_lambda.py): one 3x3 convolution of 16 channels, stride 1, no padding,
    ReLU, flattened. On a 10x10xC MinAtar image that is 8 * 8 * 16 = 1024 features, which the
    paper feeds to one 128-unit dense layer (`hidden_sizes` (128,) here).

    `__call__(obs [..., H, W, C]) -> [..., features]`; any number of leading batch axes.
    """

    channels: int = 16
    kernel: int = 3

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        k, (height, width, channels) = self.kernel, obs.shape[-3:]
        kernel = self.param("kernel", orthogonal(np.sqrt(2.0)), (k, k, channels, self.channels))
        bias = self.param("bias", nn.initializers.zeros, (self.channels,))
        # The convolution as k*k shifted views and one matrix product (im2col): on this CPU the
        # gradient of PPO's loss on 1024 MinAtar frames costs about 2/3 of XLA's convolution's.
        rows, cols = height - k + 1, width - k + 1
        patches = [obs[..., i : i + rows, j : j + cols, :] for i in range(k) for j in range(k)]
        x = nn.relu(jnp.concatenate(patches, axis=-1) @ kernel.reshape(k * k * channels, -1) + bias)
        return x.reshape((*x.shape[:-3], -1))


class Conv(nn.Module):
    """`ConvTorso` then `head` (a policy head or the value MLP)."""

    head: nn.Module

    @nn.compact
    def __call__(self, obs: jax.Array) -> Any:
        return self.head(ConvTorso()(obs))


class Recurrent(nn.Module):
    """obs -> a Dense layer of `width` units and the activation -> a GRU or LSTM cell of `width`
    units -> `head` (PureJaxRL's `ppo_rnn.py` torso: embed, cell, MLP head).

    `__call__(obs, state) -> (head output, state)` takes one step of a batch [B, ...]; the state
    is the cell's carry ([B, width], or (c, h) for an LSTM).
    """

    cell: str
    width: int
    activation: str
    head: nn.Module

    @nn.compact
    def __call__(self, obs: jax.Array, state: Any) -> tuple[Any, Any]:
        x = ACTIVATIONS[self.activation](nn.Dense(self.width, kernel_init=orthogonal(np.sqrt(2.0)))(obs))
        # The recurrent kernel's orthogonal init is this module's (flax's calls LAPACK's QR).
        cell = nn.GRUCell if self.cell == "gru" else nn.OptimizedLSTMCell
        state, y = cell(self.width, recurrent_kernel_init=orthogonal())(state, x)
        return self.head(y), state


def recurrent_state(cell: str, width: int, batch: int) -> Any:
    """A cell's initial state for `batch` rows: zeros, [batch, width] (GRU) or a (c, h) pair (LSTM)."""
    zeros = jnp.zeros((batch, width), jnp.float32)
    return zeros if cell == "gru" else (zeros, zeros)


def reset_state(state: Any, initial: Any, start: jax.Array) -> Any:
    """`state` with the rows where `start` [B] is True replaced by `initial`'s: where an episode
    starts, the policy forgets. The collector and the update both reset through here."""
    return jax.tree.map(lambda s, i: jnp.where(start.reshape(start.shape + (1,) * (s.ndim - 1)), i, s), state,
                        initial)  # fmt: skip


def unroll(network: Network, params: Any, state: Any, obs: jax.Array, start: jax.Array) -> Any:
    """A stateful network's outputs along sequences: [B, T, ...] from each row's state at t = 0.

    The state is reset to the initial one at every step whose `start` [B, T] is True, before the
    step, as the collector resets it after the step that ended the episode; the state at t = 0
    is taken as given (the collector's, already reset). Gradients flow through all T steps
    (truncated backpropagation through time, truncated at the rollout's start).
    """

    def apply(obs_t, state_t):
        return network.apply(params, obs_t, state_t)

    out = unroll_steps(apply, network.initial_state(start.shape[0]), state, jnp.swapaxes(obs, 0, 1),
                       jnp.swapaxes(start, 0, 1))  # fmt: skip
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), out)


def unroll_steps(apply: Callable[[jax.Array, Any], tuple[Any, Any]], initial: Any, state: Any, obs: jax.Array,
                 start: jax.Array) -> Any:  # fmt: skip
    """`unroll`'s loop, time-major: apply(obs_t, state) -> (output, state) along [T, B] steps
    from `state` at t = 0, reset to `initial` before every step whose `start` [T, B] is True.
    Returns the outputs [T, B, ...]. Anything with a carried state replays a recorded
    trajectory through here: a network's parameters, or an agent's policy (`kl_rl.reference`)."""

    def step(carry, xs):
        obs_t, start_t = xs
        out, carry = apply(obs_t, reset_state(carry, initial, start_t))
        return carry, out

    _, out = jax.lax.scan(step, state, (obs, start))
    return out


def make_policy(
    action_space: gym.Space,
    hidden_sizes: Sequence[int],
    activation: str,
    distribution: str = "auto",
    init_log_std: Any = 0.0,
    network: str = "mlp",
) -> Network:
    """The policy network: observation -> distribution over actions.

    With a recurrent `network` (gru, lstm) the first hidden size is the cell's width and the
    rest are the head's hidden layers; the network then carries a state (`Network`). With cnn
    the observations are images [..., H, W, C] and `ConvTorso` comes before the hidden layers.
    """
    if activation not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}")
    if network not in NETWORKS:
        raise ConfigError(f"unknown {{network}} {network!r}; use one of {', '.join(NETWORKS)}", "network")
    head_sizes = tuple(hidden_sizes)[1:] if network in RECURRENT else tuple(hidden_sizes)
    if resolve_distribution(distribution, action_space) == "categorical":
        module = CategoricalHead(head_sizes, activation, int(action_space.n))
    else:
        module = GaussianHead(head_sizes, activation, int(np.prod(action_space.shape)), init_log_std)
    if network == "mlp":
        return Network(init=module.init, apply=module.apply)
    if network == "cnn":
        conv = Conv(module)
        return Network(init=conv.init, apply=conv.apply)
    width = int(hidden_sizes[0])
    recurrent = Recurrent(network, width, activation, module)

    def initial_state(batch: int) -> Any:
        return recurrent_state(network, width, batch)

    return Network(
        init=lambda key, obs: recurrent.init(key, obs, initial_state(obs.shape[0])),
        apply=recurrent.apply,
        initial_state=initial_state,
    )


def make_value(hidden_sizes: Sequence[int], activation: str, network: str = "mlp") -> Network:
    """The critic: observation -> scalar value (the trailing unit axis is squeezed).

    With `network` cnn it has its own `ConvTorso` (a separate net from the policy's, as the
    MLPs are); otherwise it is an MLP of its input: the observation, or for a recurrent policy
    with `critic_state` the observation beside the policy's carried state
    (`kl_rl.agents.common.critic_input`).
    """
    module = MLP(tuple(hidden_sizes), activation, 1, 1.0)
    if network == "cnn":
        module = Conv(module)
    return Network(init=module.init, apply=lambda params, obs: module.apply(params, obs)[..., 0])


class _Block(nn.Module):
    """Pre-LayerNorm causal self-attention and a 4x GELU MLP, each in a residual branch (GPT-2)."""

    width: int
    heads: int
    out_std: float

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        init, out_init = nn.initializers.normal(0.02), nn.initializers.normal(self.out_std)
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(
            num_heads=self.heads, qkv_features=self.width, kernel_init=init, out_kernel_init=out_init
        )(h, h, mask=mask)
        h = nn.LayerNorm()(x)
        h = nn.Dense(self.width, kernel_init=out_init)(nn.gelu(nn.Dense(4 * self.width, kernel_init=init)(h)))
        return x + h


class TokenTransformer(nn.Module):
    """A tiny causal transformer over a token buffer (GPT-2's layout: token and learned position
    embeddings, pre-LN blocks, a final LayerNorm, a linear head).

    `__call__(obs)` reads the buffer [..., L] (float or int token ids; the prompt holds no PAD)
    and returns the head's output at the last non-PAD position, which predicts the next token;
    `all_positions(tokens)` returns it at every position.

    Attributes:
      vocab_size, length: the token ids and the buffer length L.
      pad: the PAD id.
      layers, width, heads: the transformer's shape (width divisible by heads).
      out_dim: the head's units (the vocabulary for a policy, 1 for a value head).
    """

    vocab_size: int
    length: int
    pad: int
    layers: int
    width: int
    heads: int
    out_dim: int

    def setup(self) -> None:
        init = nn.initializers.normal(0.02)
        self.embed = nn.Embed(self.vocab_size, self.width, embedding_init=init)
        self.position = self.param("position", init, (self.length, self.width))
        # GPT-2 scales the residual branches' output layers by 1/sqrt(2 * layers).
        out_std = 0.02 / np.sqrt(2.0 * self.layers)
        self.blocks = [_Block(self.width, self.heads, out_std) for _ in range(self.layers)]
        self.norm = nn.LayerNorm()
        self.head = nn.Dense(self.out_dim, kernel_init=init)

    def features(self, tokens: jax.Array) -> jax.Array:
        tokens = jnp.asarray(tokens).astype(jnp.int32)
        x = self.embed(tokens) + self.position
        mask = nn.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def all_positions(self, tokens: jax.Array) -> jax.Array:
        return self.head(self.features(tokens))

    def __call__(self, obs: jax.Array) -> jax.Array:
        tokens = jnp.asarray(obs).astype(jnp.int32)
        x = self.features(tokens)
        last = jnp.sum(tokens != self.pad, axis=-1) - 1
        return self.head(jnp.take_along_axis(x, last[..., None, None], axis=-2)[..., 0, :])


class KVCache(NamedTuple):
    """A token policy's carried state while it samples: every layer's attention keys and values
    of the buffer's positions so far, and whether the row starts an episode.

    Attributes:
      key, value: [B, layers, heads, L, head_dim] (heads before positions: a one-token step's
        attention is then a batched product over contiguous rows, 3x faster on a CPU than the
        [L, heads] order); positions not yet written hold zeros.
      fresh: [B] bool, the row has cached nothing (an episode starts): its next step prefills the
        prompt. The collector's reset (`reset_state`) sets it where an episode ends.
    """

    key: jax.Array
    value: jax.Array
    fresh: jax.Array


def _sub(module: nn.Module, params: Any, x: jax.Array) -> jax.Array:
    return module.apply({"params": params}, x)


def _attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array) -> jax.Array:
    """`flax.linen.dot_product_attention` (the query scaled by 1/sqrt(d), masked logits at the
    float's minimum, softmax in float32) on keys and values laid out [B, heads, L, d]: queries
    [B, n, heads, d], mask [B, 1, n, L]; returns [B, n, heads, d]."""
    query = query / jnp.sqrt(query.shape[-1]).astype(query.dtype)
    logits = jnp.einsum("bqhd,bhld->bhql", query, key)
    weights = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(logits.dtype).min), axis=-1)
    return jnp.einsum("bhql,bhld->bqhd", weights, value)


def _scatter(cache: jax.Array, new: jax.Array, write: jax.Array, written: jax.Array) -> jax.Array:
    """The cache [B, heads, L, d] with new [B, n, heads, d] written at the one-hot positions
    write [B, n, L] (written [B, 1, L, 1]: any of them); one token needs no product."""
    if new.shape[1] == 1:
        return jnp.where(written, jnp.swapaxes(new, 1, 2), cache)
    return jnp.where(written, jnp.einsum("bnl,bnhd->bhld", write, new), cache)


def _cached_pass(shape: dict, params: Any, tokens: jax.Array, position: jax.Array, key: jax.Array,
                 value: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """`TokenTransformer`'s pass over n new tokens [B, n] at positions `position` [B, n], which
    attend to themselves causally and to the cached keys and values [B, layers, heads, L, d] of
    the positions before them (writes past a row's positions are never read: the mask stops at
    each query's own position). The same parameters and flax modules as the one-pass
    `features`, so the outputs agree with it to float rounding.

    Only the last new token's output is computed through the last block (the others' keys and
    values are all the cache needs of them there): the next token's distribution is read there.

    Returns:
      The last block's output at the last new token [B, width] (before the final LayerNorm and
      the head), and the cache with the new tokens' keys and values written.
    """
    p = params["params"]
    layers, width, heads = shape["layers"], shape["width"], shape["heads"]
    length = key.shape[3]
    x = jnp.take(p["embed"]["embedding"], tokens, axis=0) + jnp.take(p["position"], position, axis=0)
    # [B, 1, n, L]: the query at position q sees cache slot k iff k <= q.
    mask = (jnp.arange(length)[None, None, :] <= position[..., None])[:, None]
    write = jax.nn.one_hot(position, length, dtype=x.dtype)  # [B, n, L]
    written = jnp.max(write, axis=1)[:, None, :, None] > 0  # [B, 1, L, 1]
    qkv = nn.DenseGeneral((heads, width // heads), axis=-1)
    new_key, new_value = [], []
    for i in range(layers):
        b = p[f"blocks_{i}"]
        a = b["MultiHeadDotProductAttention_0"]
        h = _sub(nn.LayerNorm(), b["LayerNorm_0"], x)
        k, v = (_sub(qkv, a[name], h) for name in ("key", "value"))
        if i == layers - 1:
            # Past the last block nothing reads the earlier new tokens: the last one goes on alone.
            x, h, mask = x[:, -1:], h[:, -1:], mask[..., -1:, :]
        q = _sub(qkv, a["query"], h)
        # Scatter the new rows' keys and values into the cache (positions differ per row).
        k_all, v_all = _scatter(key[:, i], k, write, written), _scatter(value[:, i], v, write, written)
        new_key.append(k_all)
        new_value.append(v_all)
        attended = _attention(q, k_all, v_all, mask)
        x = x + _sub(nn.DenseGeneral(width, axis=(-2, -1)), a["out"], attended)
        h = _sub(nn.LayerNorm(), b["LayerNorm_1"], x)
        x = x + _sub(nn.Dense(width), b["Dense_0"], nn.gelu(_sub(nn.Dense(4 * width), b["Dense_1"], h)))
    return x[:, 0], jnp.stack(new_key, 1), jnp.stack(new_value, 1)


def _head(shape: dict, params: Any, x: jax.Array) -> jax.Array:
    """`TokenTransformer`'s final LayerNorm and head on features [..., width]."""
    p = params["params"]
    return _sub(nn.Dense(shape["out_dim"]), p["head"], _sub(nn.LayerNorm(), p["norm"], x))


def make_token_networks(observation_space: gym.Space, action_space: gym.Space, layers: int, width: int,
                        heads: int) -> tuple[Network, Network]:  # fmt: skip
    """A token policy (buffer -> Categorical over the next token) and a token critic (buffer ->
    value), two transformers of the same shape, for a `kl_rl.envs.tasks.TokenSpace`."""
    if layers <= 0 or width <= 0 or heads <= 0 or width % heads:
        raise ConfigError(
            f"{{layers}}, {{width}} and {{heads}} must be positive with width divisible by heads, got "
            f"{layers}, {width}, {heads}",
            "layers",
            "width",
            "heads",
        )
    shape = dict(
        vocab_size=int(action_space.n), length=int(observation_space.shape[0]), pad=int(observation_space.pad),
        layers=layers, width=width, heads=heads,
    )  # fmt: skip
    policy = TokenTransformer(out_dim=int(action_space.n), **shape)
    value = TokenTransformer(out_dim=1, **shape)
    # PAD is not a token a response can hold: the policy never emits it (its logit is -inf), so
    # the buffer's non-PAD count is always the position of the next token.
    allowed = jnp.arange(int(action_space.n)) != shape["pad"]
    return (
        Network(
            init=policy.init,
            apply=lambda p, obs: categorical(policy.apply(p, obs), allowed),
            sequence=lambda p, tokens: categorical(policy.apply(p, tokens, method="all_positions"), allowed),
        ),
        Network(
            init=value.init,
            apply=lambda p, obs: value.apply(p, obs)[..., 0],
            sequence=lambda p, tokens: value.apply(p, tokens, method="all_positions")[..., 0],
        ),
    )


def kv_sampler(observation_space: gym.Space, action_space: gym.Space, layers: int, width: int,
               heads: int) -> tuple[Callable[[int], KVCache], Callable[..., tuple[Any, KVCache]]]:  # fmt: skip
    """The token policy of `make_token_networks` as a stateful sampler that carries a `KVCache`:
    (initial_state(batch) -> an empty cache, step(params, obs, cache) -> (Categorical, cache)).

    A step embeds only the buffer's last token, at its position (the non-PAD count - 1), and
    attends to the cached keys and values of the positions before it. A row whose cache is
    `fresh` (an episode starts; its buffer is the prompt alone) prefills instead: the prompt's P
    tokens in one causal pass. Which pass runs is chosen per step for the whole batch (a
    `lax.switch`; under `jax.vmap`, where a per-row branch would become a select that runs
    every branch, for the whole vmapped batch): no row fresh, the one-token pass; every row
    fresh, the prefill alone; a mix, both, each row keeping its own. The uncached policy runs
    P + H positions at every step. So the cache pays most where episodes start together: an
    episodic rollout (the token agents'), which starts every env at its first step and keeps the
    cache after an env's first episode (`kl_rl.rollout.collect`, first_episode_only), prefills
    once and then runs the one-token pass. The distribution is `apply`'s on the same buffer, to
    float rounding, for any mix of fresh and extending rows.
    """
    length, pad = int(observation_space.shape[0]), int(observation_space.pad)
    prompt = int(observation_space.prompt_length)
    shape = dict(layers=layers, width=width, heads=heads, out_dim=int(action_space.n))
    allowed = jnp.arange(int(action_space.n)) != pad
    cache_shape = (layers, heads, length, width // heads)

    def initial_state(batch: int) -> KVCache:
        zeros = jnp.zeros((batch, *cache_shape), jnp.float32)
        return KVCache(zeros, zeros, jnp.ones(batch, bool))

    def extend(params: Any, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(features [B, width] at each row's last token, keys, values) with that token cached."""
        last = jnp.sum(tokens != pad, axis=-1) - 1
        token = jnp.take_along_axis(tokens, last[:, None], axis=-1)
        return _cached_pass(shape, params, token, last[:, None], cache.key, cache.value)

    def prefill(params: Any, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The prompt's pass for every row: a fresh row's step (the buffer is its prompt)."""
        # The prefill attends within the prompt: a cache of P positions, padded to L after.
        batch = tokens.shape[0]
        positions = jnp.broadcast_to(jnp.arange(prompt), (batch, prompt))
        empty = jnp.zeros((batch, layers, heads, prompt, width // heads), jnp.float32)
        x, key, value = _cached_pass(shape, params, tokens[:, :prompt], positions, empty, empty)
        widen = ((0, 0), (0, 0), (0, 0), (0, length - prompt), (0, 0))
        return x, jnp.pad(key, widen), jnp.pad(value, widen)

    def mixed(params: Any, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`extend` for extending rows, `prefill` for fresh ones, each row keeping its own."""
        extended, prefilled = extend(params, tokens, cache), prefill(params, tokens, cache)
        return jax.tree.map(lambda p, e: jnp.where(cache.fresh.reshape(-1, *(1,) * (p.ndim - 1)), p, e), prefilled,
                            extended)  # fmt: skip

    def branch(fresh: jax.Array) -> jax.Array:
        """Which pass a step takes: 0 none fresh (extend), 1 some (both), 2 all (prefill)."""
        return jnp.where(jnp.all(fresh), 2, jnp.where(jnp.any(fresh), 1, 0))

    @jax.custom_batching.custom_vmap
    def features(params: Any, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, jax.Array, jax.Array]:
        return jax.lax.switch(branch(cache.fresh), (extend, mixed, prefill), params, tokens, cache)

    @features.def_vmap
    def _batched(axis_size: int, in_batched: list, params: Any, tokens: jax.Array, cache: KVCache):
        # One pass for the whole batch, chosen by the rows of every batch element together.
        args = jax.tree.map(lambda batched, x: x if batched else jnp.broadcast_to(x, (axis_size, *x.shape)),
                            tuple(in_batched), (params, tokens, cache))  # fmt: skip
        passes = tuple(jax.vmap(f) for f in (extend, mixed, prefill))
        return jax.lax.switch(branch(args[2].fresh), passes, *args), (True, True, True)

    def step(params: Any, obs: jax.Array, cache: KVCache) -> tuple[Any, KVCache]:
        tokens = jnp.asarray(obs).astype(jnp.int32)
        x, key, value = features(params, tokens, cache)
        return categorical(_head(shape, params, x), allowed), KVCache(key, value, jnp.zeros_like(cache.fresh))

    return initial_state, step
