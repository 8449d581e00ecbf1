"""Exact KL, sample estimators of KL, KL penalties, KL anchors and KL controllers.

Everything is computed in log space and stays finite, in value and gradient, for masked actions
(-inf logits), probabilities near 0 and 1, and log-stds from -20 to 5. The distributions
themselves are `kl_rl.distributions`'.

Direction, once and for all: `kl_divergence(p, q)` is KL(p || q) = E_{x~p}[log p(x) - log q(x)].
In policy optimization "old" is the behaviour policy that collected the data and "new" the one
being optimized. TRPO's constraint and PPO's adaptive penalty use KL(old || new) (`kl_old_new`);
KL(new || old) (`kl_new_old`) is the mirror-descent direction of MDPO and the direction of the
RLHF penalty KL(pi || pi_ref).
"""

from collections.abc import Callable
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kl_rl.distributions import Categorical, DiagGaussian, Distribution

# The estimators that exponentiate log r clip it here: exp(log r) overflows float32 past ~88, and
# 30 keeps r log r summable over large batches. |log r| > 30 is a ratio beyond 1e13, far outside
# any trust region, so the clip only caps values that already signal a diverged policy.
_LOG_RATIO_CLIP = 30.0
# Below this |log r|, exp(l) - 1 - l is summed as a Taylor series (truncation error ~1e-7
# relative): the direct form cancels to an absolute error of ~eps * |l| on a value of ~l^2 / 2.
_SERIES_CUTOFF = 0.2


def kl_divergence(p: Distribution, q: Distribution) -> jax.Array:
    """Exact KL(p || q) = E_{x~p}[log p(x) - log q(x)], summed over the event axis.

    Categorical: sum_a p(a) (log p(a) - log q(a)), with terms where p(a) = 0 taken as 0, so two
    distributions masked alike have finite KL and gradients (an action p allows and q masks gives
    +inf, the true value). DiagGaussian: the closed form
    sum_d [log s_q - log s_p + (s_p^2 + (m_p - m_q)^2) / (2 s_q^2) - 1/2].

    Args:
      p: the distribution the expectation is under, batch shape [...].
      q: same family, batch shape broadcastable with p's.

    Returns:
      KL(p || q), shape [...].
    """
    if isinstance(p, Categorical) and isinstance(q, Categorical):
        log_p, log_q = p.log_probs, q.log_probs
        valid = log_p > -jnp.inf
        # Double where: with -inf replaced before the product, the discarded branch (p(a) = 0) is
        # finite in value and gradient, so its zero cotangent never meets an inf (0 * inf = nan).
        safe_p = jnp.where(valid, log_p, 0.0)
        safe_q = jnp.where(valid, log_q, 0.0)
        return jnp.sum(jnp.where(valid, jnp.exp(safe_p) * (safe_p - safe_q), 0.0), axis=-1)
    if isinstance(p, DiagGaussian) and isinstance(q, DiagGaussian):
        log_std_ratio = p.log_std - q.log_std
        z = (p.mean - q.mean) * jnp.exp(-q.log_std)
        # exp(2 (log s_p - log s_q)) rather than s_p^2 / s_q^2: finite for log-stds from -20 to 5.
        terms = -log_std_ratio + 0.5 * (jnp.exp(2.0 * log_std_ratio) + jnp.square(z)) - 0.5
        return jnp.sum(terms, axis=-1)
    raise TypeError(f"no closed-form KL between {type(p).__name__} and {type(q).__name__}")


def kl_old_new(old: Distribution, new: Distribution) -> jax.Array:
    """KL(old || new), the mass-covering direction, per state.

    The direction of TRPO's trust region, E_s[KL(pi_old || pi_theta)] <= delta (Schulman et al.
    2015, eq. 12), of PPO's adaptive KL penalty (Schulman et al. 2017, sec. 4), and of MPO's M-step
    constraint (Abdolmaleki et al. 2018).
    """
    return kl_divergence(old, new)


def kl_new_old(old: Distribution, new: Distribution) -> jax.Array:
    """KL(new || old), the mode-seeking direction, per state.

    The proximity term of on-policy Mirror Descent Policy Optimization (Tomar et al. 2020), and,
    with old = pi_ref, the RLHF penalty KL(pi || pi_ref) of Ziegler et al. (2019).
    """
    return kl_divergence(new, old)


# Sample estimators (Schulman 2020, "Approximating KL Divergence"). Each takes log p(x) and
# log q(x) for samples x ~ q and returns one estimate per sample; average them. They estimate
# values: when x is drawn from the distribution being differentiated, the gradient of an unbiased
# KL estimate is not in general an unbiased estimate of the KL's gradient.


def _expm1_minus_x(log_r: jax.Array) -> jax.Array:
    """exp(l) - 1 - l = (r - 1) - log r, to float precision in value and gradient for any l."""
    small = jnp.abs(log_r) < _SERIES_CUTOFF
    x = jnp.where(small, log_r, 0.0)  # keeps a huge or infinite l out of the series' gradient
    series = x**2 * (1 / 2 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x / 720))))
    return jnp.where(small, series, jnp.expm1(log_r) - log_r)


def _x_exp_x_minus_expm1(log_r: jax.Array) -> jax.Array:
    """l exp(l) - (exp(l) - 1) = r log r - (r - 1) for l in [-30, 30], to float precision.

    Above l = -1 it is r ((1/r - 1) + log r), a product of two precise factors. Below, where that
    product's derivative would cancel, it is r (l - 1) + 1, which cancels in neither (expm1 is
    avoided there: its derivative, expm1(l) + 1, loses all precision as r -> 0).
    """
    r = jnp.exp(log_r)
    return jnp.where(log_r < -1.0, r * (log_r - 1.0) + 1.0, r * _expm1_minus_x(-log_r))


def kl_k1(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """k1 = -log r, r = p(x)/q(x), x ~ q: unbiased for KL(q || p), high variance, can be < 0.

    With samples from the behaviour policy q = old and p = new this estimates KL(old || new), the
    `approx_kl` of Spinning Up's PPO. Not clipped: finite whenever the log-probs are, +inf when
    p(x) = 0 (then KL(q || p) is infinite too).

    Args:
      log_p: log p(x) for x ~ q, any shape.
      log_q: log q(x), same shape.
    """
    return log_q - log_p


def kl_k2(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """k2 = (log r)^2 / 2, x ~ q: a biased, low-variance estimate of KL(q || p), always >= 0.

    Its bias is third order in log r (its mean is an f-divergence that agrees with KL(q || p) to
    second order), so it is close for p near q and off far from it (Schulman 2020). Not clipped:
    finite for |log r| < 1e19.
    """
    return 0.5 * jnp.square(log_p - log_q)


def kl_k3(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """k3 = (r - 1) - log r, x ~ q: unbiased for KL(q || p), low variance, always >= 0.

    Schulman (2020): k1 plus the zero-mean control variate r - 1. With samples from the behaviour
    policy q = old and p = new this estimates KL(old || new). Computed from log r without forming
    r - 1 by subtraction; log r is clipped above at 30 so r stays finite (beyond that the value
    saturates near 1e13).
    """
    return _expm1_minus_x(jnp.minimum(log_p - log_q, _LOG_RATIO_CLIP))


def kl_reverse_k3(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """r log r - (r - 1), x ~ q: unbiased for the reverse direction KL(p || q), always >= 0.

    Schulman (2020): E_q[r log r] = KL(p || q), plus the zero-mean control variate -(r - 1). With
    samples from the behaviour policy q = old and p = new this estimates KL(new || old). log r is
    clipped to [-30, 30]: above so r stays finite, below so r log r is 0 rather than nan when
    p(x) = 0 (the clip changes the value there by < 1e-11).
    """
    return _x_exp_x_minus_expm1(jnp.clip(log_p - log_q, -_LOG_RATIO_CLIP, _LOG_RATIO_CLIP))


class KLControllerState(NamedTuple):
    """A KL controller's state: the current penalty coefficient beta, a float32 scalar."""

    beta: jax.Array


class KLUpdate(Protocol):
    """update(state, kl, n_steps=1) -> state, the one signature of every controller."""

    def __call__(
        self, state: KLControllerState, kl: ArrayLike, n_steps: ArrayLike = 1
    ) -> KLControllerState: ...


class KLController(NamedTuple):
    """An optax-style pair of pure functions.

    init() -> state; update(state, kl, n_steps=1) -> state, where kl is the observed mean KL of
    the last policy update and n_steps the number of samples behind it.
    """

    init: Callable[[], KLControllerState]
    update: KLUpdate


def _init_state(beta: ArrayLike) -> Callable[[], KLControllerState]:
    return lambda: KLControllerState(jnp.asarray(beta, jnp.float32))


def fixed_kl_controller(beta: ArrayLike) -> KLController:
    """A constant beta; update ignores the observed KL."""

    def update(
        state: KLControllerState, kl: ArrayLike, n_steps: ArrayLike = 1
    ) -> KLControllerState:
        del kl, n_steps
        return state

    return KLController(init=_init_state(beta), update=update)


def adaptive_kl_controller(init_beta: ArrayLike, target_kl: ArrayLike) -> KLController:
    """PPO's adaptive KL coefficient (Schulman et al. 2017, sec. 4).

    After each policy update with observed d = mean KL(old || new): if d < target / 1.5,
    beta /= 2; if d > target * 1.5, beta *= 2; otherwise beta is unchanged. `init_beta` and
    `target_kl` may be traced (vmapped sweeps).
    """

    def update(
        state: KLControllerState, kl: ArrayLike, n_steps: ArrayLike = 1
    ) -> KLControllerState:
        del n_steps
        beta = jnp.where(kl > 1.5 * target_kl, 2.0 * state.beta, state.beta)
        beta = jnp.where(kl < target_kl / 1.5, 0.5 * state.beta, beta)
        return KLControllerState(beta.astype(state.beta.dtype))

    return KLController(init=_init_state(init_beta), update=update)


def proportional_kl_controller(
    init_beta: ArrayLike, target_kl: ArrayLike, horizon: ArrayLike, k_beta: ArrayLike = 0.1
) -> KLController:
    """The proportional KL controller of Ziegler et al. (2019).

    From "Fine-Tuning Language Models from Human Preferences":
    e = clip(kl / target - 1, -0.2, 0.2); beta <- beta (1 + k_beta e n_steps / horizon), where
    kl is the observed KL(pi || pi_ref) (or KL(old || new) in PPO) and n_steps the number of
    samples behind it. All hyperparameters may be traced.
    """

    def update(
        state: KLControllerState, kl: ArrayLike, n_steps: ArrayLike = 1
    ) -> KLControllerState:
        error = jnp.clip(kl / target_kl - 1.0, -0.2, 0.2)
        beta = state.beta * (1.0 + k_beta * error * n_steps / horizon)
        return KLControllerState(beta.astype(state.beta.dtype))

    return KLController(init=_init_state(init_beta), update=update)


def kl_penalty_loss(beta: ArrayLike, kl: jax.Array) -> jax.Array:
    """The loss term beta * mean(kl), e.g. kl = KL(old || new) per state for PPO's penalty."""
    return beta * jnp.mean(kl)


def decoupled_gaussian_kl(old: DiagGaussian, new: DiagGaussian) -> tuple[jax.Array, jax.Array]:
    """The two halves of KL(old || new) that V-MPO and MPO bound separately, per state.

    Song et al. (2020, arXiv:1909.12238, their Gaussian M-step) and Abdolmaleki et al. (2018, arXiv:1812.02256)
    split the KL between diagonal Gaussians into a mean part, with the new mean and the old
    standard deviation, and a covariance part, with the old mean and the new standard deviation:

        C_mu    = KL(N(m_old, s_old) || N(m_new, s_old)) = sum_d (m_new - m_old)^2 / (2 s_old^2)
        C_sigma = KL(N(m_old, s_old) || N(m_old, s_new))
                = sum_d [log s_new - log s_old + s_old^2 / (2 s_new^2) - 1/2]

    Both are in the direction KL(old || new) (`kl_old_new`). Only the new mean enters C_mu and
    only the new standard deviation enters C_sigma, so a bound on each constrains the mean and
    the covariance independently (a tight covariance bound keeps the exploration noise from
    collapsing while the mean moves). With s_new = s_old, C_mu is the full KL; with
    m_new = m_old, C_sigma is.

    Args:
      old: the anchor (the behaviour policy recorded in the buffer), batch shape [...].
      new: the policy being optimized, broadcastable with old.

    Returns:
      (C_mu, C_sigma), each of shape [...].
    """
    c_mu = 0.5 * jnp.sum(jnp.square((new.mean - old.mean) * jnp.exp(-old.log_std)), axis=-1)
    # Per dimension, with l = log s_old - log s_new: -l + (exp(2 l) - 1) / 2 = (exp(2 l) - 1 - 2 l) / 2,
    # summed without the cancellation that leaves the direct form slightly negative near l = 0.
    log_ratio = jnp.broadcast_to(old.log_std - new.log_std, jnp.broadcast_shapes(old.mean.shape, new.mean.shape))
    c_sigma = 0.5 * jnp.sum(_expm1_minus_x(2.0 * log_ratio), axis=-1)
    return c_mu, c_sigma


def m_step_kls(old: Distribution, new: Distribution) -> tuple[jax.Array, ...]:
    """The KLs an MPO-style M-step bounds, per state, all in the direction KL(old || new).

    A diagonal Gaussian's two decoupled halves (C_mu, C_sigma) (`decoupled_gaussian_kl`), each
    with its own bound; any other distribution's whole KL(old || new) (`kl_old_new`), in a
    1-tuple. V-MPO (`kl_rl.agents.vmpo`) and MPO (`kl_rl.agents.mpo`) both bound these, each
    through `kl_constraint_loss`.
    """
    if isinstance(old, DiagGaussian):
        return decoupled_gaussian_kl(old, new)
    return (kl_old_new(old, new),)


def kl_constraint_loss(alpha: jax.Array, kl: jax.Array, epsilon: ArrayLike) -> jax.Array:
    """alpha (epsilon - sg[mean kl]) + sg[alpha] mean kl: a KL bound enforced by a Lagrange multiplier.

    The two terms move different variables (Song et al. 2020, L_alpha; rlax's `kl_constraint_loss`):
    the first, whose gradient reaches only alpha, lowers alpha while the KL is under its bound
    and raises it once the KL exceeds it (gradient descent on alpha follows -(epsilon - KL));
    the second, whose gradient reaches only the policy, penalizes the KL with the current alpha.

    Args:
      alpha: the multiplier, > 0 (its gradient reaches its parameterization, e.g. log alpha).
      kl: the constrained KL per state, [B].
      epsilon: the bound on its mean.
    """
    mean_kl = jnp.mean(kl)
    return alpha * (epsilon - jax.lax.stop_gradient(mean_kl)) + jax.lax.stop_gradient(alpha) * mean_kl


def kl_penalized_reward(
    reward: jax.Array, log_prob_policy: jax.Array, log_prob_ref: jax.Array, beta: ArrayLike
) -> jax.Array:
    """r_t - beta (log pi(a_t|s_t) - log pi_ref(a_t|s_t)), Ziegler et al. (2019) / RLHF.

    With a_t ~ pi, the subtracted term is beta times the k1 sample of KL(pi || pi_ref) at s_t, so
    the penalized return's expectation subtracts beta times the summed per-state KL(pi || pi_ref).

    Args:
      reward: r_t, [T, B] or any shape.
      log_prob_policy: log pi(a_t|s_t) of the acting policy, same shape.
      log_prob_ref: log pi_ref(a_t|s_t) of the reference policy, same shape.
      beta: penalty coefficient.
    """
    return reward - beta * kl_k1(log_prob_ref, log_prob_policy)


# KL anchors. The previous iterate (PPO's and VPG's penalties, TRPO's constraint, CEM's trust
# region) is measured with `kl_old_new` above. A frozen reference policy (RLHF's penalty,
# kickstarting, fine-tuning on a leash) and the behaviour policy that collected stale data
# (policy lag, replay) are measured with the functions below.

REF_ESTIMATORS = ("exact", "k1", "k2", "k3", "abs")
REF_DIRECTIONS = ("reverse", "forward")
REF_PLACEMENTS = ("loss", "reward")


def anchor_kl(dist: Distribution, anchor: Distribution, direction: str = "reverse") -> jax.Array:
    """Exact per-state KL between a policy and an anchor policy.

    Args:
      dist: the policy pi, batch shape [...].
      anchor: the anchor pi_ref (or pi_behaviour), same family and batch shape.
      direction: "reverse" for KL(pi || anchor), mode-seeking, the RLHF penalty (Ziegler et al.
        2019); "forward" for KL(anchor || pi), mass-covering, the distillation loss of
        kickstarting (Schmitt et al. 2018) up to the anchor's entropy, which has no gradient.
    """
    if direction == "reverse":
        return kl_divergence(dist, anchor)
    if direction == "forward":
        return kl_divergence(anchor, dist)
    raise ValueError(f"unknown KL direction {direction!r}; use one of {', '.join(REF_DIRECTIONS)}")


def anchor_kl_estimate(
    log_pi: jax.Array, log_anchor: jax.Array, estimator: str, direction: str = "reverse"
) -> jax.Array:
    """One-sample estimates of the KL between pi and an anchor, at actions x ~ pi.

    l = log pi(x) - log anchor(x). For the reverse direction KL(pi || anchor):
    k1 = l (unbiased), k2 = l^2 / 2 (biased, third order in l), k3 = exp(-l) - 1 + l (unbiased,
    >= 0); Schulman (2020); abs = |l| (TRL's "abs" penalty, biased, >= 0). For the forward
    direction KL(anchor || pi), weighted by
    r = anchor(x) / pi(x) = exp(-l): k1 = r log r (unbiased), k3 = r log r - (r - 1) (unbiased,
    >= 0); k2 has no forward form.

    These are estimates of the value. Used as a loss on samples held fixed, their expected
    gradients differ (with x ~ pi and l's gradient taken through log pi only): k1 gives zero, k2
    gives grad KL(pi || anchor), k3 gives grad KL(anchor || pi) (tests/test_kl.py checks each
    by exact summation). In the reward, k1 through the score function gives grad KL(pi || anchor).

    Args:
      log_pi: log pi(x) for x drawn from pi (or from the behaviour policy that stands for it).
      log_anchor: log anchor(x), same shape.
      estimator: "k1", "k2", "k3" or "abs" (reverse only).
      direction: "reverse" or "forward".
    """
    if direction == "reverse":
        fns = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3, "abs": lambda log_p, log_q: jnp.abs(log_q - log_p)}
    elif direction == "forward":
        fns = {"k1": _forward_k1, "k3": kl_reverse_k3}
    else:
        raise ValueError(f"unknown KL direction {direction!r}; use one of {', '.join(REF_DIRECTIONS)}")
    if estimator not in fns:
        raise ValueError(f"no {estimator!r} estimator of the {direction} KL; use one of {', '.join(fns)}")
    # kl_rl's estimators take (log p, log q) for x ~ q and estimate KL(q || p) (k1, k2, k3) or
    # KL(p || q) (reverse_k3): here q = pi, the sampling policy, and p = the anchor.
    return fns[estimator](log_anchor, log_pi)


def _forward_k1(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """r log r, r = p(x)/q(x), x ~ q: unbiased for KL(p || q); log r clipped to [-30, 30]."""
    log_r = jnp.clip(log_p - log_q, -_LOG_RATIO_CLIP, _LOG_RATIO_CLIP)
    return jnp.exp(log_r) * log_r


def anchor_penalty(
    dist: Distribution,
    anchor: Distribution,
    action: jax.Array,
    estimator: str = "exact",
    direction: str = "reverse",
) -> jax.Array:
    """The per-sample KL term of an anchor penalty: exact per state, or estimated at `action`.

    Args:
      dist: the policy pi at the batch's states [...].
      anchor: the anchor at the same states.
      action: the sampled action of each state [...] (ignored by "exact").
      estimator: "exact" (`anchor_kl`) or one of "k1", "k2", "k3" (`anchor_kl_estimate`).
      direction: "reverse" (KL(pi || anchor)) or "forward" (KL(anchor || pi)).

    Returns:
      [...] values whose mean is the penalty's KL.
    """
    if estimator == "exact":
        return anchor_kl(dist, anchor, direction)
    return anchor_kl_estimate(dist.log_prob(action), anchor.log_prob(action), estimator, direction)


def check_anchor_options(estimator: str, direction: str, placement: str = "loss") -> None:
    """ValueError naming the fix for an estimator, direction or placement kl_rl has no form of."""
    if placement not in REF_PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; use one of {', '.join(REF_PLACEMENTS)}")
    if direction not in REF_DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; use one of {', '.join(REF_DIRECTIONS)}")
    if estimator not in REF_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; use one of {', '.join(REF_ESTIMATORS)}")
    if direction == "forward" and estimator in ("k2", "abs"):
        raise ValueError(f"{estimator} estimates the reverse KL only; use exact, k1 or k3 with the forward direction")


def effective_sample_size(log_weights: jax.Array) -> jax.Array:
    """(sum w)^2 / (n sum w^2) of importance weights w = exp(log_weights), as a fraction in (0, 1].

    Kish's effective sample size over n = log_weights.size samples: 1 when every weight is
    equal (target policy = behaviour policy), 1/n when one sample carries all the weight.
    Computed in log space, so weights far from 1 stay finite.
    """
    lw = jnp.ravel(log_weights)
    # The ratio is invariant to a common factor: centring keeps constant weights at exactly 1.
    lw = lw - jax.lax.stop_gradient(jnp.max(lw))
    log_n = jnp.log(jnp.asarray(lw.size, lw.dtype))
    return jnp.exp(2.0 * jax.nn.logsumexp(lw) - jax.nn.logsumexp(2.0 * lw) - log_n)
