"""Returns and advantages of time-major trajectories (rlax's `multistep.py` is the model).

Every function takes [T, B] arrays (or [T], or [T, ...]: the time axis leads) named by their
time step: r_t is the reward of transition t, v_t the value of its observation, v_tp1 the value
of its true next observation (before any autoreset), terminated_t and truncated_t whether the
episode ended there. A terminated step does not bootstrap; a truncated one (a time limit) does,
from v_tp1; the rollout's last step bootstraps too, whether or not it is done. Nothing leaks
across an episode boundary inside the rollout.

- `gae`: generalized advantage estimation (Schulman et al. 2016).
- `vtrace`: its off-policy correction with truncated importance weights (Espeholt et al. 2018).
- `discounted_returns`: Monte Carlo returns, bootstrapping where an episode is cut.
- `token_gae`: GAE over responses that end at their last token (the token-task agents).
- `n_step_targets`: the n-step return of a replayed window, as a partial return and where and
  how much to bootstrap (MPO's critic).
- `retrace_targets`: Retrace's off-policy Q targets of a replayed window (Munos et al. 2016), the
  same truncation handling (MPO's critic with `critic_target="retrace"`).
"""

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

# V-trace exponentiates log importance weights: clipped here, any weight stays finite.
_LOG_RHO_CLIP = 30.0


def _td_errors(r_t: jax.Array, v_t: jax.Array, v_tp1: jax.Array, terminated_t: ArrayLike, truncated_t: ArrayLike,
               gamma: ArrayLike) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """(delta_t = r_t + gamma (1 - terminated_t) v_tp1 - v_t, 1 - done_t), done = terminated | truncated."""
    not_terminated = 1.0 - jnp.asarray(terminated_t).astype(r_t.dtype)
    not_done = 1.0 - jnp.logical_or(terminated_t, truncated_t).astype(r_t.dtype)
    return r_t + gamma * not_terminated * v_tp1 - v_t, not_done


def _lambda_sum(delta_t: jax.Array, trace_t: jax.Array, gamma: ArrayLike, lambda_: ArrayLike) -> jax.Array:
    """A_t = delta_t + gamma lambda trace_t A_{t+1}, backwards from A_T = 0."""

    def step(a_tp1, xs):
        delta, trace = xs
        a_t = delta + gamma * lambda_ * trace * a_tp1
        return a_t, a_t

    a_end = jnp.zeros_like(delta_t[0])
    _, advantages = jax.lax.scan(step, a_end, (delta_t, trace_t), reverse=True)
    return advantages


def gae(
    r_t: ArrayLike,
    v_t: ArrayLike,
    v_tp1: ArrayLike,
    terminated_t: ArrayLike,
    truncated_t: ArrayLike,
    gamma: ArrayLike,
    lambda_: ArrayLike,
) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimation (Schulman et al. 2016, arXiv:1506.02438).

    delta_t = r_t + gamma (1 - terminated_t) v_tp1 - v_t, so a truncated step bootstraps and a
    terminated one does not. A_t = delta_t + gamma lambda (1 - done_t) A_{t+1} with
    done = terminated | truncated, so no advantage leaks across an episode boundary, and A_T = 0
    past the rollout (its last step still bootstraps through delta).

    Args:
      r_t: rewards [T, B].
      v_t: V(obs_t) [T, B].
      v_tp1: V(next_obs_t) [T, B].
      terminated_t: bool [T, B].
      truncated_t: bool [T, B].
      gamma: discount, may be traced.
      lambda_: GAE lambda, may be traced.

    Returns:
      (advantages, returns), each [T, B], with returns = advantages + v_t (the lambda-returns).
    """
    r_t, v_t, v_tp1 = jnp.asarray(r_t), jnp.asarray(v_t), jnp.asarray(v_tp1)
    delta_t, not_done_t = _td_errors(r_t, v_t, v_tp1, terminated_t, truncated_t, gamma)
    advantages = _lambda_sum(delta_t, not_done_t, gamma, lambda_)
    return advantages, advantages + v_t


def vtrace(
    r_t: ArrayLike,
    v_t: ArrayLike,
    v_tp1: ArrayLike,
    terminated_t: ArrayLike,
    truncated_t: ArrayLike,
    log_rho_t: ArrayLike,
    gamma: ArrayLike,
    lambda_: ArrayLike,
    rho_clip: ArrayLike = 1.0,
    c_clip: ArrayLike = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """V-trace (Espeholt et al. 2018, eq. 1, with its lambda): `gae` off-policy.

    With the importance weights w_t = pi(a_t|s_t) / mu(a_t|s_t) of a target policy pi against the
    behaviour policy mu that collected the data, A_t = rho_t delta_t + gamma lambda c_t
    (1 - done_t) A_{t+1}, rho_t = min(rho_clip, w_t), c_t = min(c_clip, w_t), and the returns
    v_t + A_t are the V-trace targets v_s. With every weight 1 it is `gae`, bit for bit.

    Args:
      r_t, v_t, v_tp1, terminated_t, truncated_t, gamma, lambda_: as `gae`'s, [T, B].
      log_rho_t: log w_t = log pi(a_t|s_t) - log mu(a_t|s_t) [T, B]; clipped above at 30, so any
        weight is finite.
      rho_clip: rho-bar, the truncation of the weight on each TD error.
      c_clip: c-bar, the truncation of the weights that carry the trace.

    Returns:
      (advantages, returns), each [T, B], with returns = advantages + v_t.
    """
    r_t, v_t, v_tp1 = jnp.asarray(r_t), jnp.asarray(v_t), jnp.asarray(v_tp1)
    delta_t, not_done_t = _td_errors(r_t, v_t, v_tp1, terminated_t, truncated_t, gamma)
    w_t = jnp.exp(jnp.minimum(jnp.asarray(log_rho_t), _LOG_RHO_CLIP))
    advantages = _lambda_sum(jnp.minimum(rho_clip, w_t) * delta_t, jnp.minimum(c_clip, w_t) * not_done_t, gamma,
                             lambda_)  # fmt: skip
    return advantages, advantages + v_t


def discounted_returns(
    r_t: ArrayLike,
    v_tp1: ArrayLike,
    terminated_t: ArrayLike,
    truncated_t: ArrayLike,
    gamma: ArrayLike,
) -> jax.Array:
    """Discounted returns that bootstrap on truncation and at the rollout's end.

    G_t = r_t + gamma (1 - terminated_t) * (v_tp1_t if done_t or t == T - 1 else G_{t+1}), with
    done = terminated | truncated: never bootstraps past a true terminal state.

    Args:
      r_t: rewards [T, B].
      v_tp1: V(next_obs_t) [T, B], the value of each transition's true next observation.
      terminated_t: bool [T, B].
      truncated_t: bool [T, B].
      gamma: discount, may be traced.

    Returns:
      G_t [T, B].
    """
    r_t, v_tp1 = jnp.asarray(r_t), jnp.asarray(v_tp1)
    not_terminated = 1.0 - jnp.asarray(terminated_t).astype(r_t.dtype)
    done = jnp.logical_or(terminated_t, truncated_t)

    def step(g_tp1, xs):
        r, v_next, not_term, done = xs
        g_t = r + gamma * not_term * jnp.where(done, v_next, g_tp1)
        return g_t, g_t

    # Seeding the carry with v_tp1[-1] makes the last step bootstrap whether or not it is done.
    _, returns = jax.lax.scan(step, v_tp1[-1], (r_t, v_tp1, not_terminated, done), reverse=True)
    return returns


def token_gae(r_t: jax.Array, v_t: jax.Array, mask_t: jax.Array, gamma: ArrayLike,
              lambda_: ArrayLike) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """GAE over responses, each ending (terminally) at its last token: `gae` for token tasks.

    A response is the tokens where mask_t is 1 (a prefix of the time axis); it is one whole
    episode, so nothing bootstraps past it: v_tp1 = v_{t+1} inside it and 0 at its last token.
    delta_t = r_t + gamma v_tp1 - v_t, A_t = (delta_t + gamma lambda A_{t+1}) mask_t: 0 past the
    response, whatever r_t and v_t hold there.

    Args:
      r_t: per-token rewards [T, B] (T the response length, B the responses).
      v_t: the critic's value before each token [T, B].
      mask_t: 1.0 where a token was generated [T, B].
      gamma: discount over the tokens, may be traced.
      lambda_: GAE lambda, may be traced.

    Returns:
      (advantages, returns), each [T, B], with returns = advantages + v_t.
    """
    v_tp1 = jnp.concatenate([v_t[1:] * mask_t[1:], jnp.zeros_like(v_t[:1])], axis=0)
    delta_t = r_t + gamma * v_tp1 - v_t

    def step(a_tp1, xs):
        delta, m = xs
        a_t = (delta + gamma * lambda_ * a_tp1) * m
        return a_t, a_t

    _, advantages = jax.lax.scan(step, jnp.zeros(r_t.shape[1:]), (delta_t, mask_t), reverse=True)
    return advantages, advantages + v_t


def n_step_targets(r_t: ArrayLike, terminated_t: ArrayLike, truncated_t: ArrayLike,
                   gamma: ArrayLike) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """The n-step return of a window of n steps, up to its bootstrap (Sutton and Barto, ch. 7).

    The return sums r_0 + gamma r_1 + ... up to step m, the first step of the window whose
    episode ends (terminated or truncated), or the window's last step n - 1 if none does, and
    then bootstraps from the value of step m's true next observation with weight
    gamma^(m + 1) (1 - terminated_m): a truncated step (a time limit) bootstraps, a terminated
    one does not, and nothing leaks from the next episode. The caller evaluates its bootstrap
    value at next_obs[m] only (one critic call per window, not n). With v_tp1 at every step,
    `partial + discount * v_tp1[m]` is `discounted_returns(...)[0]` over the window.

    Args:
      r_t: rewards [n, B].
      terminated_t: bool [n, B].
      truncated_t: bool [n, B].
      gamma: discount, may be traced.

    Returns:
      (partial return [B], bootstrap step m [B] int32, bootstrap discount [B]).
    """
    r_t = jnp.asarray(r_t)
    n = r_t.shape[0]
    done = jnp.logical_or(terminated_t, truncated_t)
    # Steps after the first done one belong to another episode; the last step always ends the sum.
    ended = jnp.cumsum(done.astype(jnp.int32), axis=0) - done.astype(jnp.int32) > 0
    steps = jnp.arange(n, dtype=r_t.dtype).reshape((n,) + (1,) * (r_t.ndim - 1))
    discounts = jnp.asarray(gamma, r_t.dtype) ** steps
    partial = jnp.sum(jnp.where(ended, 0.0, discounts * r_t), axis=0)
    last = jnp.where(jnp.any(done, axis=0), jnp.argmax(done, axis=0), n - 1).astype(jnp.int32)
    terminated_m = jnp.take_along_axis(jnp.asarray(terminated_t), last[None], axis=0)[0]
    discount = jnp.asarray(gamma, r_t.dtype) ** (last + 1).astype(r_t.dtype) * (1.0 - terminated_m.astype(r_t.dtype))
    return partial, last, discount


def retrace_targets(
    q_t: ArrayLike,
    v_tp1: ArrayLike,
    r_t: ArrayLike,
    terminated_t: ArrayLike,
    truncated_t: ArrayLike,
    log_rho_t: ArrayLike,
    gamma: ArrayLike,
    lambda_: ArrayLike,
) -> jax.Array:
    """Retrace targets of a window of n steps (Munos et al. 2016, arXiv:1606.02647, eq. 3).

    Q_ret(s_0, a_0) = Q'(s_0, a_0) + sum_j gamma^j (prod_{i=1..j} c_i) delta_j, with
    delta_j = r_j + gamma (1 - terminated_j) V'(s'_j) - Q'(s_j, a_j), s'_j step j's true next
    observation, and c_i = lambda min(1, pi'(a_i|s_i) / mu(a_i|s_i)) the truncated importance
    weight of the target policy pi' against the behaviour policy mu (c_0 never enters: a_0 is the
    action being evaluated). As in `n_step_targets`, the sum stops at the first step m whose
    episode ends: a truncated step bootstraps from V'(s'_m), a terminated one does not, and
    nothing of the next episode enters. With every c_i = 1 and V'(s'_j) = Q'(s_{j+1}, a_{j+1})
    inside the episode it is the n-step return built from the same V'.

    Computed backwards, A_j = delta_j + gamma c_{j+1} (1 - done_j) A_{j+1} from A_n = 0, so
    element j of the result is the target of the window's remainder from step j (element 0 is
    the whole window's); it matches rlax's `retrace_continuous` targets where no episode ends.

    Args:
      q_t: Q'(s_j, a_j) [n, B], the target critic at the window's actions.
      v_tp1: V'(s'_j) = E_{a ~ pi'}[Q'(s'_j, a)] [n, B].
      r_t: rewards [n, B].
      terminated_t: bool [n, B].
      truncated_t: bool [n, B].
      log_rho_t: log pi'(a_j|s_j) - log mu(a_j|s_j) [n, B]; step 0's is unused.
      gamma: discount, may be traced.
      lambda_: Retrace's lambda, may be traced.

    Returns:
      Q_ret [n, B].
    """
    q_t, v_tp1, r_t = jnp.asarray(q_t), jnp.asarray(v_tp1), jnp.asarray(r_t)
    delta_t, not_done_t = _td_errors(r_t, q_t, v_tp1, terminated_t, truncated_t, gamma)
    # min(1, w) = exp(min(0, log w)): never overflows.
    c_t = jnp.exp(jnp.minimum(jnp.asarray(log_rho_t, r_t.dtype), 0.0))
    c_tp1 = jnp.concatenate([c_t[1:], jnp.zeros_like(c_t[:1])], axis=0)
    return q_t + _lambda_sum(delta_t, c_tp1 * not_done_t, gamma, lambda_)
