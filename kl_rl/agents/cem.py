"""The cross-entropy method over policy parameters (Szita and Lorincz 2006), with a KL trust region.

The search distribution is a diagonal Gaussian N(mu, diag(sigma^2)) over the flattened policy
parameters. Each iteration (one update of the training loop):

1. The population -- `population_size` parameter vectors -- acts in the vectorized env, each
   member in `episodes_per_member` envs of its own, all members at once (`vmap` over members in
   the one collector). Rollouts of an episodic agent start from freshly reset envs and last the
   env's time limit, so every member's first episode in each of its envs ends; its fitness is
   the mean undiscounted return of those first episodes.
2. The top `elite_frac` of the population are the elites. The new search Gaussian is their mean
   and per-coordinate variance plus decaying extra noise Z_t = max(noise_init - t noise_decay,
   0) (Szita and Lorincz's remedy for premature collapse).
3. KL trust region (optional, `trust_kl` > 0): if KL(old || new) between the search Gaussians
   exceeds epsilon, the new one is pulled back along the straight line in (mu, log sigma) towards
   the old one, to the largest fraction whose KL(old || new), in the KL module's closed form, is
   <= epsilon (found by bisection).
4. The next population samples the new Gaussian. With `keep_elites` > 0 it also carries this
   iteration's best members, stored through the shared replay buffer, which are scored again
   next iteration alongside the new samples.

The policy that `evaluate` and the final return use is the search mean mu.

With a frozen reference policy (`kl-rl train --reference`), a member's fitness is its return
minus ref_kl_coef times its mean exact KL to the reference (in `ref_kl_direction`) over the
states of its scored episodes.
"""

import math

import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from kl_rl import buffer, kl, networks
from kl_rl.agents.base import Agent, RolloutSpec, UpdateContext
from kl_rl.agents.common import PolicyConfig
from kl_rl.config import static
from kl_rl.distributions import DiagGaussian
from kl_rl.errors import ConfigError


@flax.struct.dataclass
class CEMConfig(PolicyConfig):
    """CEM hyperparameters. The policy is linear by default (hidden_sizes empty)."""

    hidden_sizes: tuple[int, ...] = static(())
    """Hidden layer widths of the policy MLP; empty for a linear policy."""
    iterations: int = static(50)
    """CEM iterations (updates); each scores the whole population."""
    population_size: int = static(32)
    """Parameter vectors scored per iteration, kept elites included."""
    episodes_per_member: int = static(1)
    """Episodes each member is scored on (in parallel envs); its fitness is their mean return."""
    num_steps: int = static(0)
    """Steps per env per iteration; 0 runs the env's time limit, so every first episode ends."""
    keep_elites: int = static(0)
    """Best members of each iteration carried into the next population (through the replay
    buffer) and scored again; 0 samples the whole population afresh."""
    deterministic: bool = static(True)
    """Members act with their policy's mode; False samples actions."""
    elite_frac: float = 0.2
    """Share of the population (at least one member) whose parameters fit the next search
    distribution; traced, so a sweep over it is one program."""
    init_std: float = 1.0
    """Initial standard deviation of the search distribution (its mean starts at 0)."""
    noise_init: float = 0.1
    """Extra variance added to the elites' at iteration 0 (Szita and Lorincz 2006)."""
    noise_decay: float = 0.002
    """Per-iteration decrease of the extra variance: Z_t = max(noise_init - t noise_decay, 0)."""
    trust_kl: float = 0.0
    """epsilon of the KL trust region on KL(old || new) between search Gaussians; 0 disables."""

    @property
    def num_envs(self) -> int:
        return self.population_size * self.episodes_per_member

    @property
    def num_updates(self) -> int:
        return self.iterations

    @property
    def rollout(self) -> RolloutSpec:
        """Each member's episodes, one env each, a whole time limit long (num_steps 0), unnormalized."""
        return RolloutSpec(num_envs=self.num_envs, num_steps=self.num_steps, eval_episodes=self.eval_episodes,
                           env_params=True)  # fmt: skip

    @property
    def normalize_obs(self) -> bool:
        """CEM scores raw observations (no running normalizer, whose moments would drift)."""
        return False

    def validate(self, action_space: gym.Space) -> None:
        """Raises ConfigError on values no run could use."""
        self._check_common(action_space, ("iterations", "population_size", "episodes_per_member"), ("init_std",))
        if self.num_steps < 0:
            raise ConfigError(
                f"{{num_steps}} must be >= 0 (0: the env's time limit), got {self.num_steps}", "num_steps"
            )
        if not 0.0 < float(self.elite_frac) <= 1.0:
            raise ConfigError(f"{{elite_frac}} must lie in (0, 1], got {float(self.elite_frac)}", "elite_frac")
        if not 0 <= self.keep_elites < self.population_size:
            raise ConfigError(
                f"{{keep_elites}} must lie in [0, {{population_size}}) = [0, {self.population_size}), "
                f"got {self.keep_elites}",
                "keep_elites",
                "population_size",
            )
        if self.ref_kl_in != "loss" or self.ref_kl_estimator != "exact":
            raise ConfigError(
                "cem subtracts the exact KL to the reference from each member's fitness; "
                "leave {ref_kl_in} loss and {ref_kl_estimator} exact",
                "ref_kl_in",
                "ref_kl_estimator",
            )
        for name in ("noise_init", "noise_decay", "trust_kl"):
            value = float(getattr(self, name))
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{{{name}}} must be a number >= 0, got {value}", name)


@flax.struct.dataclass
class CEMState:
    """The search distribution, the population it sampled and the kept elites."""

    search: DiagGaussian
    population: jax.Array
    elites: buffer.BufferState
    iteration: jax.Array


in_first_episode = buffer.in_first_episode


def first_episode_returns(traj) -> jax.Array:
    """[N] undiscounted return of each env's first episode in a [T, N] trajectory."""
    return jnp.sum(jnp.where(in_first_episode(traj), traj.reward, 0.0), axis=0)


def pull_back(old: DiagGaussian, new: DiagGaussian, epsilon: jax.Array, iters: int = 30):
    """The Gaussian a fraction alpha of the way from `old` to `new` in (mean, log_std).

    alpha = 1 if KL(old || new) <= epsilon; otherwise the largest alpha found by bisection with
    KL(old || interpolated) <= epsilon (alpha = 0, the old Gaussian, always qualifies).

    Returns:
      (the Gaussian, alpha).
    """

    def at(alpha):
        return DiagGaussian(
            old.mean + alpha * (new.mean - old.mean), old.log_std + alpha * (new.log_std - old.log_std)
        )

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        ok = kl.kl_divergence(old, at(mid)) <= epsilon
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, iters, bisect, (jnp.zeros(()), jnp.ones(())))
    alpha = jnp.where(kl.kl_divergence(old, new) <= epsilon, 1.0, lo)
    return at(alpha), alpha


def cem(config: CEMConfig, observation_space: gym.Space, action_space: gym.Space) -> Agent:
    """Builds CEM's pure functions for one env's spaces."""
    policy_net = networks.make_policy(
        action_space, config.hidden_sizes, config.activation, config.distribution, config.init_log_std
    )
    dummy_obs = jnp.zeros((1, *observation_space.shape), jnp.float32)
    template = jax.eval_shape(policy_net.init, jax.random.key(0), dummy_obs)
    _, unravel = ravel_pytree(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), template))
    num_params = sum(math.prod(s.shape) for s in jax.tree.leaves(template))
    pop, num_kept = config.population_size, config.keep_elites
    obs_ndim = len(observation_space.shape)

    def sample(key: jax.Array, search: DiagGaussian, n: int) -> jax.Array:
        return search.mean + jnp.exp(search.log_std) * jax.random.normal(key, (n, num_params))

    def init(key: jax.Array) -> CEMState:
        search = DiagGaussian(
            jnp.zeros(num_params), jnp.full(num_params, jnp.log(jnp.asarray(config.init_std, jnp.float32)))
        )
        example = {"params": jax.ShapeDtypeStruct((num_params,), jnp.float32), "fitness": jnp.zeros(())}
        return CEMState(
            search=search,
            population=sample(key, search, pop),
            elites=buffer.init(max(num_kept, 1), example),
            iteration=jnp.zeros((), jnp.int32),
        )

    def member_dists(population: jax.Array, obs: jax.Array):
        """Each member's action distribution on its own envs' observations [P * E, ...]."""
        obs = obs.reshape(pop, config.episodes_per_member, *obs.shape[1:])
        dist = jax.vmap(lambda theta, o: policy_net.apply(unravel(theta), o))(population, obs)
        return jax.tree.map(lambda x: x.reshape(pop * config.episodes_per_member, *x.shape[2:]), dist)

    def act(key: jax.Array, state: CEMState, obs: jax.Array):
        dist = member_dists(state.population, obs)
        action = dist.mode() if config.deterministic else dist.sample(key)
        return action, dist.log_prob(action), dist

    def policy(state: CEMState, obs: jax.Array):
        return policy_net.apply(unravel(state.search.mean), obs)

    def value(state: CEMState, obs: jax.Array) -> jax.Array:
        return jnp.zeros(obs.shape[: obs.ndim - obs_ndim], jnp.float32)

    def update(key: jax.Array, state: CEMState, traj, ctx: UpdateContext):
        ref_beta = ctx.ref_beta
        fitness = first_episode_returns(traj).reshape(pop, config.episodes_per_member).mean(axis=1)
        extra = {}
        if traj.ref_dist is not None and ref_beta is not None:
            # Each member's mean KL to the reference over the states of its scored episodes.
            scored = in_first_episode(traj)
            per_state = kl.anchor_kl(traj.dist, traj.ref_dist, config.ref_kl_direction)
            per_env = jnp.sum(jnp.where(scored, per_state, 0.0), axis=0) / jnp.maximum(jnp.sum(scored, axis=0), 1)
            member_kl = per_env.reshape(pop, config.episodes_per_member).mean(axis=1)
            fitness = fitness - ref_beta * member_kl
            extra["member_kl_ref"] = jnp.mean(member_kl)
        # Best first (ties in population order); the elites are the first n of them, selected by
        # weights rather than a slice so that elite_frac can be a traced value.
        order = jnp.argsort(-fitness, stable=True)
        ranked, ranked_fitness = state.population[order], fitness[order]
        num_elites = jnp.clip(jnp.round(config.elite_frac * pop), 1, pop)
        weights = (jnp.arange(pop) < num_elites).astype(jnp.float32) / num_elites
        mean = weights @ ranked
        extra_var = jnp.maximum(config.noise_init - config.noise_decay * state.iteration, 0.0)
        std = jnp.sqrt(weights @ jnp.square(ranked - mean) + extra_var)
        # Clamped so a collapsed coordinate keeps a finite log-std (and finite KL).
        proposal = DiagGaussian(mean, jnp.log(jnp.maximum(std, 1e-8)))
        search, alpha = jax.lax.cond(
            config.trust_kl > 0,
            lambda: pull_back(state.search, proposal, config.trust_kl),
            lambda: (proposal, jnp.ones(())),
        )
        kept = buffer.add_batch(
            state.elites, {"params": ranked[: max(num_kept, 1)], "fitness": ranked_fitness[: max(num_kept, 1)]}
        )
        population = sample(key, search, pop - num_kept)
        if num_kept:
            population = jnp.concatenate([population, kept.data["params"]])
        new_state = CEMState(search=search, population=population, elites=kept, iteration=state.iteration + 1)
        metrics = {
            "fitness_mean": jnp.mean(fitness),
            "fitness_elite": weights @ ranked_fitness,
            "fitness_best": ranked_fitness[0],
            "kl": kl.kl_divergence(state.search, search),
            "entropy": search.entropy(),
            "search_std": jnp.mean(jnp.exp(search.log_std)),
            "trust_alpha": alpha,
            "extra_var": extra_var,
            # Env steps inside the scored episodes; env_steps also counts the steps run after
            # an episode ended early, until the rollout's fixed length.
            "scored_steps": jnp.sum(in_first_episode(traj)).astype(jnp.float32),
            **extra,
        }
        return new_state, metrics

    return Agent(init=init, act=act, value=value, policy=policy, update=update, episodic=True)
