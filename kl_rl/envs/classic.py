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


def _constants(name: str, doc: str, **defaults: float) -> type:
    """A `flax.struct.dataclass` of float fields (traced leaves), each defaulting to its value here."""
    namespace = {"__annotations__": dict.fromkeys(defaults, float), "__doc__": doc, "__module__": __name__}
    return flax.struct.dataclass(type(name, (), {**namespace, **defaults}))


class _ClassicEnv(FuncEnv):
    """What the ports share: an id, a time limit, a params class, `params=None` meaning default,
    spaces from class constants, and (unless overridden) the state as the observation and a
    uniform initial state.

    `observation_high` bounds a Box of [-high, high] (or [observation_low, high]); `actions` is a
    Discrete space's size or a Box action's bound (a shape (1,) action in [-bound, bound]);
    `initial_high` bounds each state variable's uniform draw in [-high, high].
    """

    id: ClassVar[str]
    max_episode_steps: ClassVar[int]
    params_cls: ClassVar[type]
    observation_high: ClassVar[tuple[float, ...]]
    observation_low: ClassVar[tuple[float, ...] | None] = None
    actions: ClassVar[int | float]
    initial_high: ClassVar[tuple[float, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        high = np.array(self.observation_high, np.float32)
        low = -high if self.observation_low is None else np.array(self.observation_low, np.float32)
        self.observation_space = spaces.Box(low, high, dtype=np.float32)
        if isinstance(self.actions, int):
            self.action_space = spaces.Discrete(self.actions)
        else:
            self.action_space = spaces.Box(-self.actions, self.actions, (1,), dtype=np.float32)

    def initial(self, rng: jax.Array, params: Any = None) -> jax.Array:
        """Each state variable uniform in [-initial_high, initial_high]."""
        high = jnp.array(self.initial_high, jnp.float32)
        return jax.random.uniform(rng, high.shape, jnp.float32, -high, high)

    def observation(self, state: jax.Array, rng: jax.Array | None = None, params: Any = None) -> jax.Array:
        """The state itself."""
        return state.astype(jnp.float32)

    def transition(
        self, state: jax.Array, action: ArrayLike, rng: jax.Array | None = None, params: Any = None
    ) -> jax.Array:
        """The next state (`_transition` of the params, `params=None` meaning the defaults)."""
        return self._transition(self._params(params), state, action)

    def reward(
        self, state: jax.Array, action: ArrayLike, next_state: jax.Array, rng: jax.Array | None = None,
        params: Any = None,
    ) -> jax.Array:
        """The step's reward (`_reward` of the params)."""
        return self._reward(self._params(params), state, action, next_state)

    def terminal(self, state: jax.Array, rng: jax.Array | None = None, params: Any = None) -> jax.Array:
        """Whether `state` ends the episode (`_terminal` of the params)."""
        return self._terminal(self._params(params), state)

    def get_default_params(self, **kwargs: Any) -> Any:
        """gymnasium's constants, with `kwargs` overriding some of them."""
        return self.params_cls(**kwargs)

    def _params(self, params: Any) -> Any:
        return self.default_params if params is None else params


CartPoleParams = _constants(
    "CartPoleParams",
    "CartPole-v1's constants (`length` is half the pole's length, as in gymnasium).",
    gravity=9.8, masscart=1.0, masspole=0.1, length=0.5, force_mag=10.0, tau=0.02,
    theta_threshold_radians=12 * 2 * PI / 360, x_threshold=2.4,
)


class CartPole(_ClassicEnv):
    """CartPole-v1 (Barto, Sutton and Anderson 1983) with gymnasium's explicit Euler integrator.

    State [x, x_dot, theta, theta_dot]; action 0 pushes left, 1 right; reward 1 on every step,
    the terminating one included; terminal when |x| > 2.4 or |theta| > 12 degrees.
    """

    id = "CartPole-v1"
    max_episode_steps = 500
    params_cls = CartPoleParams
    observation_high = (2.4 * 2, np.inf, 12 * 2 * PI / 360 * 2, np.inf)
    actions = 2
    initial_high = (0.05,) * 4

    def _transition(self, p: CartPoleParams, state: jax.Array, action: ArrayLike) -> jax.Array:
        """One Euler step of tau = 0.02 s: positions move with the old velocities."""
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

    def _reward(self, p: Any, state: jax.Array, action: ArrayLike, next_state: jax.Array) -> jax.Array:
        """1 on every step, the terminating one included."""
        return jnp.float32(1.0)

    def _terminal(self, p: CartPoleParams, state: jax.Array) -> jax.Array:
        """The cart left [-2.4, 2.4] or the pole tilted past 12 degrees."""
        return (jnp.abs(state[0]) > p.x_threshold) | (jnp.abs(state[2]) > p.theta_threshold_radians)


class CartPoleNoVel(CartPole):
    """CartPole-v1 with its velocities hidden: the observation is [x, theta] of the state
    [x, x_dot, theta, theta_dot], whose dynamics, reward, termination and time limit are
    CartPole-v1's. A policy of the observation alone cannot tell which way the pole is falling,
    so the task needs memory: the "velocity-only/position-only CartPole" POMDPs of recurrent RL
    benchmarks (Ni et al. 2022, arXiv:2110.05038; Morad et al. 2023, POPGym, arXiv:2303.01859).
    No gymnasium env has this id: it runs on the JAX path only.
    """

    id = "CartPoleNoVel-v1"
    observation_high = (2.4 * 2, 12 * 2 * PI / 360 * 2)

    def observation(self, state: jax.Array, rng: jax.Array | None = None, params: Any = None) -> jax.Array:
        """[x, theta]: the positions, without the velocities."""
        return state[jnp.array([0, 2])].astype(jnp.float32)


AcrobotParams = _constants(
    "AcrobotParams",
    "Acrobot-v1's constants (both links share `link_moi`; link 2's length is never used).",
    dt=0.2, link_length_1=1.0, link_mass_1=1.0, link_mass_2=1.0, link_com_pos_1=0.5, link_com_pos_2=0.5, link_moi=1.0,
    max_vel_1=4 * PI, max_vel_2=9 * PI, gravity=9.8,
)


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
    observation_high = (1.0, 1.0, 1.0, 1.0, 4 * PI, 9 * PI)
    actions = 3
    initial_high = (0.1,) * 4

    def _transition(self, p: AcrobotParams, state: jax.Array, action: ArrayLike) -> jax.Array:
        """One RK4 step, then angles wrapped into [-pi, pi] and velocities clipped."""
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

    def _reward(self, p: AcrobotParams, state: jax.Array, action: ArrayLike, next_state: jax.Array) -> jax.Array:
        """-1, or 0 when `next_state` is terminal."""
        return jnp.where(self._terminal(p, next_state), 0.0, -1.0).astype(jnp.float32)

    def _terminal(self, p: Any, state: jax.Array) -> jax.Array:
        """The tip is above height 1: -cos(theta1) - cos(theta1 + theta2) > 1."""
        return -jnp.cos(state[0]) - jnp.cos(state[1] + state[0]) > 1.0


MountainCarParams = _constants(
    "MountainCarParams",
    "MountainCar-v0's constants.",
    min_position=-1.2, max_position=0.6, max_speed=0.07, goal_position=0.5, goal_velocity=0.0, force=0.001,
    gravity=0.0025,
)


MountainCarContinuousParams = _constants(
    "MountainCarContinuousParams",
    "MountainCarContinuous-v0's constants (its goal is at 0.45, not 0.5).",
    min_action=-1.0, max_action=1.0, min_position=-1.2, max_position=0.6, max_speed=0.07, goal_position=0.45,
    goal_velocity=0.0, power=0.0015, gravity=0.0025,
)


def _mountain_car_transition(p: Any, state: jax.Array, accel: jax.Array) -> jax.Array:
    """gymnasium's update, shared by both MountainCars: clip speed, move, stop at the left wall."""
    position, velocity = state[0], state[1]
    velocity = jnp.clip(velocity + accel - p.gravity * jnp.cos(3 * position), -p.max_speed, p.max_speed)
    position = jnp.clip(position + velocity, p.min_position, p.max_position)
    velocity = jnp.where((position == p.min_position) & (velocity < 0), 0.0, velocity)
    return jnp.stack([position, velocity])


class _MountainCarBase(_ClassicEnv):
    """State [position, velocity], starting at rest uniformly in [-0.6, -0.4]; terminal at the goal."""

    observation_low = (-1.2, -0.07)
    observation_high = (0.6, 0.07)

    def initial(self, rng: jax.Array, params: Any = None) -> jax.Array:
        """Position uniform in [-0.6, -0.4], velocity 0."""
        return jnp.stack([jax.random.uniform(rng, (), jnp.float32, -0.6, -0.4), jnp.float32(0.0)])

    def _terminal(self, p: Any, state: jax.Array) -> jax.Array:
        """Position at or past the goal with velocity >= goal_velocity (0)."""
        return (state[0] >= p.goal_position) & (state[1] >= p.goal_velocity)


class MountainCar(_MountainCarBase):
    """MountainCar-v0 (Moore 1990): action 0, 1, 2 accelerates left, not, right; reward -1 per step."""

    id = "MountainCar-v0"
    max_episode_steps = 200
    params_cls = MountainCarParams
    actions = 3

    def _transition(self, p: MountainCarParams, state: jax.Array, action: ArrayLike) -> jax.Array:
        """Velocity += (action - 1) force - gravity cos(3 position), clipped; then position += velocity."""
        return _mountain_car_transition(p, state, (jnp.asarray(action, jnp.float32) - 1.0) * p.force)

    def _reward(self, p: Any, state: jax.Array, action: ArrayLike, next_state: jax.Array) -> jax.Array:
        """-1 on every step."""
        return jnp.float32(-1.0)


class MountainCarContinuous(_MountainCarBase):
    """MountainCarContinuous-v0: a force in [-1, 1] (shape (1,)); +100 at the goal minus 0.1 a^2.

    As in gymnasium, the dynamics clip the action but the reward's 0.1 a^2 uses it unclipped.
    """

    id = "MountainCarContinuous-v0"
    max_episode_steps = 999
    params_cls = MountainCarContinuousParams
    actions = 1.0

    def _transition(self, p: MountainCarContinuousParams, state: jax.Array, action: jax.Array) -> jax.Array:
        """Velocity += power clip(action) - gravity cos(3 position), clipped; then position += velocity."""
        force = jnp.clip(action[0], p.min_action, p.max_action)
        return _mountain_car_transition(p, state, force * p.power)

    def _reward(
        self, p: MountainCarContinuousParams, state: jax.Array, action: jax.Array, next_state: jax.Array
    ) -> jax.Array:
        """100 if `next_state` is terminal, minus 0.1 action^2 of the unclipped action."""
        goal = self._terminal(p, next_state)
        return (jnp.where(goal, 100.0, 0.0) - 0.1 * jnp.square(action[0])).astype(jnp.float32)


PendulumParams = _constants(
    "PendulumParams",
    "Pendulum-v1's constants.",
    max_speed=8.0, max_torque=2.0, dt=0.05, g=10.0, m=1.0, l=1.0,
)


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
    observation_high = (1.0, 1.0, 8.0)
    actions = 2.0
    initial_high = (PI, 1.0)  # theta uniform in [-pi, pi], thetadot in [-1, 1]

    def _transition(self, p: PendulumParams, state: jax.Array, action: jax.Array) -> jax.Array:
        """Semi-implicit Euler: the new, clipped thetadot moves theta."""
        th, thdot = state[0], state[1]
        u = jnp.clip(action[0], -p.max_torque, p.max_torque)
        newthdot = thdot + (3 * p.g / (2 * p.l) * jnp.sin(th) + 3.0 / (p.m * p.l**2) * u) * p.dt
        newthdot = jnp.clip(newthdot, -p.max_speed, p.max_speed)
        return jnp.stack([th + newthdot * p.dt, newthdot])

    def observation(self, state: jax.Array, rng: jax.Array | None = None, params: Any = None) -> jax.Array:
        """[cos theta, sin theta, thetadot]."""
        return jnp.stack([jnp.cos(state[0]), jnp.sin(state[0]), state[1]]).astype(jnp.float32)

    def _reward(self, p: PendulumParams, state: jax.Array, action: jax.Array, next_state: jax.Array) -> jax.Array:
        """Minus the cost of the pre-step `state` and the clipped torque."""
        u = jnp.clip(action[0], -p.max_torque, p.max_torque)
        cost = jnp.square(_angle_normalize(state[0])) + 0.1 * jnp.square(state[1]) + 0.001 * jnp.square(u)
        return -cost.astype(jnp.float32)

    def _terminal(self, p: Any, state: jax.Array) -> jax.Array:
        """Never: Pendulum-v1 only truncates."""
        return jnp.asarray(False)
