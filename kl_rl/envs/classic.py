"""JAX ports of gymnasium's classic-control environments, on gymnasium's functional API.

Each env is a `gymnasium.experimental.functional.FuncEnv`: pure functions of (state, action, rng,
params). Constants, time limits, initial-state distributions and the state layout are exactly
gymnasium's (`env.unwrapped.state`), and tests/envs/test_parity.py steps both from the same
states. Physical constants live in a `flax.struct.dataclass` of params, so they can be traced.
Truncation is not part of a FuncEnv: `max_episode_steps` is read by `kl_rl.envs.vector.VecEnv`.
"""

from typing import Any

import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
from gymnasium.experimental.functional import FuncEnv

PI = float(np.pi)


class JaxClassicEnv(FuncEnv):
    """Shared plumbing: the default params object and float32 observations."""

    id: str
    max_episode_steps: int
    params_cls: type

    def get_default_params(self, **kwargs: Any) -> Any:
        return self.params_cls(**kwargs)

    def _params(self, params: Any) -> Any:
        return self.default_params if params is None else params


@flax.struct.dataclass
class CartPoleParams:
    gravity: float = 9.8
    masscart: float = 1.0
    masspole: float = 0.1
    length: float = 0.5
    force_mag: float = 10.0
    tau: float = 0.02
    theta_threshold_radians: float = 12 * 2 * PI / 360
    x_threshold: float = 2.4


class CartPole(JaxClassicEnv):
    """CartPole-v1 (Barto, Sutton and Anderson 1983): gymnasium's Euler integrator, reward 1 per step."""

    id = "CartPole-v1"
    max_episode_steps = 500
    params_cls = CartPoleParams
    _high = np.array([2.4 * 2, np.inf, 12 * 2 * PI / 360 * 2, np.inf], np.float32)
    observation_space = gym.spaces.Box(-_high, _high, dtype=np.float32)
    action_space = gym.spaces.Discrete(2)

    def initial(self, rng, params=None):
        return jax.random.uniform(rng, (4,), jnp.float32, -0.05, 0.05)

    def transition(self, state, action, rng=None, params=None):
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

    def observation(self, state, rng=None, params=None):
        return state.astype(jnp.float32)

    def reward(self, state, action, next_state, rng=None, params=None):
        return jnp.float32(1.0)

    def terminal(self, state, rng=None, params=None):
        p = self._params(params)
        x, theta = state[0], state[2]
        return (jnp.abs(x) > p.x_threshold) | (jnp.abs(theta) > p.theta_threshold_radians)


@flax.struct.dataclass
class AcrobotParams:
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
    """gymnasium's `wrap`: shifts by whole periods until low <= x <= high (endpoints kept)."""
    period = high - low
    x = jnp.where(x > high, x - period * jnp.ceil((x - high) / period), x)
    return jnp.where(x < low, x + period * jnp.ceil((low - x) / period), x)


class Acrobot(JaxClassicEnv):
    """Acrobot-v1 (Sutton 1996): the "book" dynamics, one RK4 step of dt = 0.2, no torque noise."""

    id = "Acrobot-v1"
    max_episode_steps = 500
    params_cls = AcrobotParams
    _high = np.array([1.0, 1.0, 1.0, 1.0, 4 * PI, 9 * PI], np.float32)
    observation_space = gym.spaces.Box(-_high, _high, dtype=np.float32)
    action_space = gym.spaces.Discrete(3)

    def initial(self, rng, params=None):
        return jax.random.uniform(rng, (4,), jnp.float32, -0.1, 0.1)

    def _dsdt(self, p: AcrobotParams, s: jax.Array, torque: jax.Array) -> jax.Array:
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

    def transition(self, state, action, rng=None, params=None):
        p = self._params(params)
        torque = jnp.asarray(action, jnp.float32) - 1.0
        dt = p.dt
        k1 = self._dsdt(p, state, torque)
        k2 = self._dsdt(p, state + dt / 2 * k1, torque)
        k3 = self._dsdt(p, state + dt / 2 * k2, torque)
        k4 = self._dsdt(p, state + dt * k3, torque)
        ns = state + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        return jnp.stack(
            [
                _wrap(ns[0], -PI, PI),
                _wrap(ns[1], -PI, PI),
                jnp.clip(ns[2], -p.max_vel_1, p.max_vel_1),
                jnp.clip(ns[3], -p.max_vel_2, p.max_vel_2),
            ]
        )

    def observation(self, state, rng=None, params=None):
        return jnp.stack(
            [jnp.cos(state[0]), jnp.sin(state[0]), jnp.cos(state[1]), jnp.sin(state[1]), state[2], state[3]]
        ).astype(jnp.float32)

    def reward(self, state, action, next_state, rng=None, params=None):
        return jnp.where(self.terminal(next_state, None, params), 0.0, -1.0).astype(jnp.float32)

    def terminal(self, state, rng=None, params=None):
        return -jnp.cos(state[0]) - jnp.cos(state[1] + state[0]) > 1.0


@flax.struct.dataclass
class MountainCarParams:
    min_position: float = -1.2
    max_position: float = 0.6
    max_speed: float = 0.07
    goal_position: float = 0.5
    goal_velocity: float = 0.0
    force: float = 0.001
    gravity: float = 0.0025


def _mountain_car_step(p, state: jax.Array, accel: jax.Array) -> jax.Array:
    """gymnasium's update shared by both MountainCars: clip speed, move, stop at the left wall."""
    position, velocity = state[0], state[1]
    velocity = jnp.clip(velocity + accel - p.gravity * jnp.cos(3 * position), -p.max_speed, p.max_speed)
    position = jnp.clip(position + velocity, p.min_position, p.max_position)
    velocity = jnp.where((position == p.min_position) & (velocity < 0), 0.0, velocity)
    return jnp.stack([position, velocity])


def _mountain_car_initial(rng: jax.Array) -> jax.Array:
    return jnp.stack([jax.random.uniform(rng, (), jnp.float32, -0.6, -0.4), jnp.float32(0.0)])


class MountainCar(JaxClassicEnv):
    """MountainCar-v0 (Moore 1990): reward -1 per step until the goal at position 0.5."""

    id = "MountainCar-v0"
    max_episode_steps = 200
    params_cls = MountainCarParams
    observation_space = gym.spaces.Box(
        np.array([-1.2, -0.07], np.float32), np.array([0.6, 0.07], np.float32), dtype=np.float32
    )
    action_space = gym.spaces.Discrete(3)

    def initial(self, rng, params=None):
        return _mountain_car_initial(rng)

    def transition(self, state, action, rng=None, params=None):
        p = self._params(params)
        return _mountain_car_step(p, state, (jnp.asarray(action, jnp.float32) - 1.0) * p.force)

    def observation(self, state, rng=None, params=None):
        return state.astype(jnp.float32)

    def reward(self, state, action, next_state, rng=None, params=None):
        return jnp.float32(-1.0)

    def terminal(self, state, rng=None, params=None):
        p = self._params(params)
        return (state[0] >= p.goal_position) & (state[1] >= p.goal_velocity)


@flax.struct.dataclass
class ContinuousMountainCarParams:
    min_action: float = -1.0
    max_action: float = 1.0
    min_position: float = -1.2
    max_position: float = 0.6
    max_speed: float = 0.07
    goal_position: float = 0.45
    goal_velocity: float = 0.0
    power: float = 0.0015
    gravity: float = 0.0025


class ContinuousMountainCar(JaxClassicEnv):
    """MountainCarContinuous-v0: +100 at the goal (0.45) minus 0.1 a^2 of the *unclipped* action."""

    id = "MountainCarContinuous-v0"
    max_episode_steps = 999
    params_cls = ContinuousMountainCarParams
    observation_space = gym.spaces.Box(
        np.array([-1.2, -0.07], np.float32), np.array([0.6, 0.07], np.float32), dtype=np.float32
    )
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)

    def initial(self, rng, params=None):
        return _mountain_car_initial(rng)

    def transition(self, state, action, rng=None, params=None):
        p = self._params(params)
        force = jnp.clip(action[0], p.min_action, p.max_action)
        return _mountain_car_step(p, state, force * p.power)

    def observation(self, state, rng=None, params=None):
        return state.astype(jnp.float32)

    def reward(self, state, action, next_state, rng=None, params=None):
        goal = self.terminal(next_state, None, params)
        return (jnp.where(goal, 100.0, 0.0) - 0.1 * jnp.square(action[0])).astype(jnp.float32)

    def terminal(self, state, rng=None, params=None):
        p = self._params(params)
        return (state[0] >= p.goal_position) & (state[1] >= p.goal_velocity)


@flax.struct.dataclass
class PendulumParams:
    max_speed: float = 8.0
    max_torque: float = 2.0
    dt: float = 0.05
    g: float = 10.0
    m: float = 1.0
    l: float = 1.0  # noqa: E741 (gymnasium's name for the pendulum length)


class Pendulum(JaxClassicEnv):
    """Pendulum-v1: cost theta^2 + 0.1 thetadot^2 + 0.001 u^2 of the pre-step state, never terminates."""

    id = "Pendulum-v1"
    max_episode_steps = 200
    params_cls = PendulumParams
    observation_space = gym.spaces.Box(
        -np.array([1.0, 1.0, 8.0], np.float32), np.array([1.0, 1.0, 8.0], np.float32), dtype=np.float32
    )
    action_space = gym.spaces.Box(-2.0, 2.0, (1,), dtype=np.float32)

    def initial(self, rng, params=None):
        high = jnp.array([PI, 1.0], jnp.float32)
        return jax.random.uniform(rng, (2,), jnp.float32, -high, high)

    def transition(self, state, action, rng=None, params=None):
        p = self._params(params)
        th, thdot = state[0], state[1]
        u = jnp.clip(action[0], -p.max_torque, p.max_torque)
        newthdot = thdot + (3 * p.g / (2 * p.l) * jnp.sin(th) + 3.0 / (p.m * p.l**2) * u) * p.dt
        newthdot = jnp.clip(newthdot, -p.max_speed, p.max_speed)
        return jnp.stack([th + newthdot * p.dt, newthdot])

    def observation(self, state, rng=None, params=None):
        return jnp.stack([jnp.cos(state[0]), jnp.sin(state[0]), state[1]]).astype(jnp.float32)

    def reward(self, state, action, next_state, rng=None, params=None):
        p = self._params(params)
        th, thdot = state[0], state[1]
        u = jnp.clip(action[0], -p.max_torque, p.max_torque)
        th_normalized = ((th + PI) % (2 * PI)) - PI
        return -(jnp.square(th_normalized) + 0.1 * jnp.square(thdot) + 0.001 * jnp.square(u))

    def terminal(self, state, rng=None, params=None):
        return jnp.asarray(False)
