"""JAX ports of gymnasium's classic-control environments, on gymnasium's functional API.

Each env is a `gymnasium.experimental.functional.FuncEnv`: pure functions of (state, action, rng,
params), jittable and vmappable. Constants, time limits, spaces, initial-state distributions and
the state layout (`gym.make(id).unwrapped.state`) are exactly gymnasium's, and
tests/envs/test_parity.py steps both from the same states. The physical constants live in a
`flax.struct.dataclass` of params (`env.default_params`; `params=None` means those), so they can
be traced. States are float32 arrays. Truncation is not part of a FuncEnv: `max_episode_steps` is
read by `kl_rl.envs.vector.VecEnv`.
"""

from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from gymnasium import spaces
from gymnasium.experimental.functional import FuncEnv
from jax.typing import ArrayLike

PI = float(np.pi)


class _ClassicEnv(FuncEnv):
    """What the ports share: an id, a time limit, a params class, and `params=None` meaning default."""

    id: ClassVar[str]
    max_episode_steps: ClassVar[int]
    params_cls: ClassVar[type]

    def get_default_params(self, **kwargs: Any) -> Any:
        """gymnasium's constants, with `kwargs` overriding some of them."""
        return self.params_cls(**kwargs)

    def _params(self, params: Any) -> Any:
        return self.default_params if params is None else params


@flax.struct.dataclass
class CartPoleParams:
    """CartPole-v1's constants (`length` is half the pole's length, as in gymnasium)."""

    gravity: float = 9.8
    masscart: float = 1.0
    masspole: float = 0.1
    length: float = 0.5
    force_mag: float = 10.0
    tau: float = 0.02
    theta_threshold_radians: float = 12 * 2 * PI / 360
    x_threshold: float = 2.4


class CartPole(_ClassicEnv):
    """CartPole-v1 (Barto, Sutton and Anderson 1983) with gymnasium's explicit Euler integrator.

    State [x, x_dot, theta, theta_dot]; action 0 pushes left, 1 right; reward 1 on every step,
    the terminating one included; terminal when |x| > 2.4 or |theta| > 12 degrees.
    """

    id = "CartPole-v1"
    max_episode_steps = 500
    params_cls = CartPoleParams

    def __init__(self) -> None:
        super().__init__()
        high = np.array([2.4 * 2, np.inf, 12 * 2 * PI / 360 * 2, np.inf], np.float32)
        self.observation_space = spaces.Box(-high, high, dtype=np.float32)
        self.action_space = spaces.Discrete(2)

    def initial(self, rng: jax.Array, params: CartPoleParams | None = None) -> jax.Array:
        """Each state variable uniform in [-0.05, 0.05]."""
        return jax.random.uniform(rng, (4,), jnp.float32, -0.05, 0.05)

    def transition(
        self, state: jax.Array, action: ArrayLike, rng: jax.Array | None = None, params: CartPoleParams | None = None
    ) -> jax.Array:
        """One Euler step of tau = 0.02 s: positions move with the old velocities."""
        p = self._params(params)
        x, x_dot, theta, theta_dot = state
        total_mass = p.masspole + p.masscart
        polemass_length = p.masspole * p.length
        force = jnp.where(action == 1, p.force_mag, -p.force_mag)
        costheta, sintheta = jnp.cos(theta), jnp.sin(theta)
        temp = (force + polemass_length * jnp.square(theta_dot) * sintheta) / total_mass
        thetaacc = (p.gravity * sintheta - costheta * temp) / (
            p.length * (4.0 / 3.0 - p.masspole * jnp.square(costheta) / total_mass)
        )
        xacc = temp - polemass_length * thetaacc * costheta / total_mass
        return jnp.stack(
            [x + p.tau * x_dot, x_dot + p.tau * xacc, theta + p.tau * theta_dot, theta_dot + p.tau * thetaacc]
        )

    def observation(self, state: jax.Array, rng: jax.Array | None = None, params: Any = None) -> jax.Array:
        """The state itself."""
        return state.astype(jnp.float32)

    def reward(
        self,
        state: jax.Array,
        action: ArrayLike,
        next_state: jax.Array,
        rng: jax.Array | None = None,
        params: Any = None,
    ) -> jax.Array:
        """1 on every step, the terminating one included."""
        return jnp.float32(1.0)

    def terminal(
        self, state: jax.Array, rng: jax.Array | None = None, params: CartPoleParams | None = None
    ) -> jax.Array:
        """The cart left [-2.4, 2.4] or the pole tilted past 12 degrees."""
        p = self._params(params)
        return (jnp.abs(state[0]) > p.x_threshold) | (jnp.abs(state[2]) > p.theta_threshold_radians)


@flax.struct.dataclass
class AcrobotParams:
    """Acrobot-v1's constants (both links share `link_moi`; link 2's length is never used)."""

    dt: float = 0.2
    link_length_1: float = 1.0
    link_mass_1: float = 1.0
    link_mass_2: float = 1.0
    link_com_pos_1: float = 0.5
    link_com_pos_2: float = 0.5
    link_moi: float = 1.0
    max_vel_1: float = 4 * PI
    max_vel_2: float = 9 * PI
    gravity: float = 9.8


def _wrap(x: jax.Array, low: float, high: float) -> jax.Array:
    """gymnasium's `wrap`: shifts x by whole periods into [low, high] (both endpoints kept)."""
    period = high - low
    x = jnp.where(x > high, x - period * jnp.ceil((x - high) / period), x)
    return jnp.where(x < low, x + period * jnp.ceil((low - x) / period), x)


def _acrobot_dsdt(p: AcrobotParams, s: jax.Array, torque: jax.Array) -> jax.Array:
    """ds/dt of gymnasium's "book" dynamics (its default `book_or_nips`)."""
    m1, m2, l1 = p.link_mass_1, p.link_mass_2, p.link_length_1
    lc1, lc2, i1, i2, g = p.link_com_pos_1, p.link_com_pos_2, p.link_moi, p.link_moi, p.gravity
    theta1, theta2, dtheta1, dtheta2 = s
    d1 = m1 * lc1**2 + m2 * (l1**2 + lc2**2 + 2 * l1 * lc2 * jnp.cos(theta2)) + i1 + i2
    d2 = m2 * (lc2**2 + l1 * lc2 * jnp.cos(theta2)) + i2
    phi2 = m2 * lc2 * g * jnp.cos(theta1 + theta2 - PI / 2.0)
    phi1 = (
        -m2 * l1 * lc2 * dtheta2**2 * jnp.sin(theta2)
        - 2 * m2 * l1 * lc2 * dtheta2 * dtheta1 * jnp.sin(theta2)
        + (m1 * lc1 + m2 * l1) * g * jnp.cos(theta1 - PI / 2)
        + phi2
    )
    ddtheta2 = (torque + d2 / d1 * phi1 - m2 * l1 * lc2 * dtheta1**2 * jnp.sin(theta2) - phi2) / (
        m2 * lc2**2 + i2 - d2**2 / d1
    )
    ddtheta1 = -(d2 * ddtheta2 + phi1) / d1
    return jnp.stack([dtheta1, dtheta2, ddtheta1, ddtheta2])


class Acrobot(_ClassicEnv):
    """Acrobot-v1 (Sutton 1996): gymnasium's "book" dynamics, one RK4 step of dt = 0.2, no torque noise.

    State [theta1, theta2, dtheta1, dtheta2]; action 0, 1, 2 applies torque -1, 0, +1; reward -1
    per step and 0 on the step that lifts the tip above height 1, which is terminal.
    """

    id = "Acrobot-v1"
    max_episode_steps = 500
    params_cls = AcrobotParams

    def __init__(self) -> None:
        super().__init__()
        high = np.array([1.0, 1.0, 1.0, 1.0, 4 * PI, 9 * PI], np.float32)
        self.observation_space = spaces.Box(-high, high, dtype=np.float32)
        self.action_space = spaces.Discrete(3)

    def initial(self, rng: jax.Array, params: AcrobotParams | None = None) -> jax.Array:
        """Each state variable uniform in [-0.1, 0.1]."""
        return jax.random.uniform(rng, (4,), jnp.float32, -0.1, 0.1)

    def transition(
        self, state: jax.Array, action: ArrayLike, rng: jax.Array | None = None, params: AcrobotParams | None = None
    ) -> jax.Array:
        """One RK4 step, then angles wrapped into [-pi, pi] and velocities clipped."""
        p = self._params(params)
        torque = jnp.asarray(action, jnp.float32) - 1.0
        dt = p.dt
        k1 = _acrobot_dsdt(p, state, torque)
        k2 = _acrobot_dsdt(p, state + dt / 2 * k1, torque)
        k3 = _acrobot_dsdt(p, state + dt / 2 * k2, torque)
        k4 = _acrobot_dsdt(p, state + dt * k3, torque)
        ns = state + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        return jnp.stack(
            [
                _wrap(ns[0], -PI, PI),
                _wrap(ns[1], -PI, PI),
                jnp.clip(ns[2], -p.max_vel_1, p.max_vel_1),
                jnp.clip(ns[3], -p.max_vel_2, p.max_vel_2),
            ]
        )

    def observation(self, state: jax.Array, rng: jax.Array | None = None, params: Any = None) -> jax.Array:
        """[cos theta1, sin theta1, cos theta2, sin theta2, dtheta1, dtheta2]."""
        theta1, theta2, dtheta1, dtheta2 = state
        obs = jnp.stack([jnp.cos(theta1), jnp.sin(theta1), jnp.cos(theta2), jnp.sin(theta2), dtheta1, dtheta2])
        return obs.astype(jnp.float32)

    def reward(
        self,
        state: jax.Array,
        action: ArrayLike,
        next_state: jax.Array,
        rng: jax.Array | None = None,
        params: AcrobotParams | None = None,
    ) -> jax.Array:
        """-1, or 0 when `next_state` is terminal."""
        return jnp.where(self.terminal(next_state, None, params), 0.0, -1.0).astype(jnp.float32)

    def terminal(self, state: jax.Array, rng: jax.Array | None = None, params: Any = None) -> jax.Array:
        """The tip is above height 1: -cos(theta1) - cos(theta1 + theta2) > 1."""
        return -jnp.cos(state[0]) - jnp.cos(state[1] + state[0]) > 1.0


@flax.struct.dataclass
class MountainCarParams:
    """MountainCar-v0's constants."""

    min_position: float = -1.2
    max_position: float = 0.6
    max_speed: float = 0.07
    goal_position: float = 0.5
    goal_velocity: float = 0.0
    force: float = 0.001
    gravity: float = 0.0025


@flax.struct.dataclass
class MountainCarContinuousParams:
    """MountainCarContinuous-v0's constants (its goal is at 0.45, not 0.5)."""

    min_action: float = -1.0
    max_action: float = 1.0
    min_position: float = -1.2
    max_position: float = 0.6
    max_speed: float = 0.07
    goal_position: float = 0.45
    goal_velocity: float = 0.0
    power: float = 0.0015
    gravity: float = 0.0025


def _mountain_car_transition(p: Any, state: jax.Array, accel: jax.Array) -> jax.Array:
    """gymnasium's update, shared by both MountainCars: clip speed, move, stop at the left wall."""
    position, velocity = state[0], state[1]
    velocity = jnp.clip(velocity + accel - p.gravity * jnp.cos(3 * position), -p.max_speed, p.max_speed)
    position = jnp.clip(position + velocity, p.min_position, p.max_position)
    velocity = jnp.where((position == p.min_position) & (velocity < 0), 0.0, velocity)
    return jnp.stack([position, velocity])


class _MountainCarBase(_ClassicEnv):
    """State [position, velocity], starting at rest uniformly in [-0.6, -0.4]; terminal at the goal."""

    def __init__(self) -> None:
        super().__init__()
        low, high = np.array([-1.2, -0.07], np.float32), np.array([0.6, 0.07], np.float32)
        self.observation_space = spaces.Box(low, high, dtype=np.float32)

    def initial(self, rng: jax.Array, params: Any = None) -> jax.Array:
        """Position uniform in [-0.6, -0.4], velocity 0."""
        return jnp.stack([jax.random.uniform(rng, (), jnp.float32, -0.6, -0.4), jnp.float32(0.0)])

    def observation(self, state: jax.Array, rng: jax.Array | None = None, params: Any = None) -> jax.Array:
        """The state itself."""
        return state.astype(jnp.float32)

    def terminal(self, state: jax.Array, rng: jax.Array | None = None, params: Any = None) -> jax.Array:
        """Position at or past the goal with velocity >= goal_velocity (0)."""
        p = self._params(params)
        return (state[0] >= p.goal_position) & (state[1] >= p.goal_velocity)


class MountainCar(_MountainCarBase):
    """MountainCar-v0 (Moore 1990): action 0, 1, 2 accelerates left, not, right; reward -1 per step."""

    id = "MountainCar-v0"
    max_episode_steps = 200
    params_cls = MountainCarParams

    def __init__(self) -> None:
        super().__init__()
        self.action_space = spaces.Discrete(3)

    def transition(
        self, state: jax.Array, action: ArrayLike, rng: jax.Array | None = None, params: MountainCarParams | None = None
    ) -> jax.Array:
        """Velocity += (action - 1) force - gravity cos(3 position), clipped; then position += velocity."""
        p = self._params(params)
        return _mountain_car_transition(p, state, (jnp.asarray(action, jnp.float32) - 1.0) * p.force)

    def reward(
        self,
        state: jax.Array,
        action: ArrayLike,
        next_state: jax.Array,
        rng: jax.Array | None = None,
        params: Any = None,
    ) -> jax.Array:
        """-1 on every step."""
        return jnp.float32(-1.0)


class MountainCarContinuous(_MountainCarBase):
    """MountainCarContinuous-v0: a force in [-1, 1] (shape (1,)); +100 at the goal minus 0.1 a^2.

    As in gymnasium, the dynamics clip the action but the reward's 0.1 a^2 uses it unclipped.
    """

    id = "MountainCarContinuous-v0"
    max_episode_steps = 999
    params_cls = MountainCarContinuousParams

    def __init__(self) -> None:
        super().__init__()
        self.action_space = spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)

    def transition(
        self,
        state: jax.Array,
        action: jax.Array,
        rng: jax.Array | None = None,
        params: MountainCarContinuousParams | None = None,
    ) -> jax.Array:
        """Velocity += power clip(action) - gravity cos(3 position), clipped; then position += velocity."""
        p = self._params(params)
        force = jnp.clip(action[0], p.min_action, p.max_action)
        return _mountain_car_transition(p, state, force * p.power)

    def reward(
        self,
        state: jax.Array,
        action: jax.Array,
        next_state: jax.Array,
        rng: jax.Array | None = None,
        params: MountainCarContinuousParams | None = None,
    ) -> jax.Array:
        """100 if `next_state` is terminal, minus 0.1 action^2 of the unclipped action."""
        goal = self.terminal(next_state, None, params)
        return (jnp.where(goal, 100.0, 0.0) - 0.1 * jnp.square(action[0])).astype(jnp.float32)


@flax.struct.dataclass
class PendulumParams:
    """Pendulum-v1's constants."""

    max_speed: float = 8.0
    max_torque: float = 2.0
    dt: float = 0.05
    g: float = 10.0
    m: float = 1.0
    l: float = 1.0  # noqa: E741 (gymnasium's name for the pendulum length)


def _angle_normalize(x: jax.Array) -> jax.Array:
    """x shifted by whole turns into [-pi, pi), with gymnasium's floored modulo."""
    return ((x + PI) % (2 * PI)) - PI


class Pendulum(_ClassicEnv):
    """Pendulum-v1: swing up and hold; never terminates, so episodes end at the 200-step limit.

    State [theta, thetadot] (theta is never wrapped); action a torque of shape (1,), clipped to
    [-2, 2]; reward -(theta^2 + 0.1 thetadot^2 + 0.001 u^2) of the pre-step state, theta normalized.
    """

    id = "Pendulum-v1"
    max_episode_steps = 200
    params_cls = PendulumParams

    def __init__(self) -> None:
        super().__init__()
        high = np.array([1.0, 1.0, 8.0], np.float32)
        self.observation_space = spaces.Box(-high, high, dtype=np.float32)
        self.action_space = spaces.Box(-2.0, 2.0, (1,), dtype=np.float32)

    def initial(self, rng: jax.Array, params: PendulumParams | None = None) -> jax.Array:
        """theta uniform in [-pi, pi], thetadot uniform in [-1, 1]."""
        high = jnp.array([PI, 1.0], jnp.float32)
        return jax.random.uniform(rng, (2,), jnp.float32, -high, high)

    def transition(
        self, state: jax.Array, action: jax.Array, rng: jax.Array | None = None, params: PendulumParams | None = None
    ) -> jax.Array:
        """Semi-implicit Euler: the new, clipped thetadot moves theta."""
        p = self._params(params)
        th, thdot = state[0], state[1]
        u = jnp.clip(action[0], -p.max_torque, p.max_torque)
        newthdot = thdot + (3 * p.g / (2 * p.l) * jnp.sin(th) + 3.0 / (p.m * p.l**2) * u) * p.dt
        newthdot = jnp.clip(newthdot, -p.max_speed, p.max_speed)
        return jnp.stack([th + newthdot * p.dt, newthdot])

    def observation(self, state: jax.Array, rng: jax.Array | None = None, params: Any = None) -> jax.Array:
        """[cos theta, sin theta, thetadot]."""
        return jnp.stack([jnp.cos(state[0]), jnp.sin(state[0]), state[1]]).astype(jnp.float32)

    def reward(
        self,
        state: jax.Array,
        action: jax.Array,
        next_state: jax.Array,
        rng: jax.Array | None = None,
        params: PendulumParams | None = None,
    ) -> jax.Array:
        """Minus the cost of the pre-step `state` and the clipped torque."""
        p = self._params(params)
        u = jnp.clip(action[0], -p.max_torque, p.max_torque)
        cost = jnp.square(_angle_normalize(state[0])) + 0.1 * jnp.square(state[1]) + 0.001 * jnp.square(u)
        return -cost.astype(jnp.float32)

    def terminal(self, state: jax.Array, rng: jax.Array | None = None, params: Any = None) -> jax.Array:
        """Never: Pendulum-v1 only truncates."""
        return jnp.asarray(False)
