"""Pictures of env states: what `kl_rl.video` draws an episode's frames with.

Each env kind is drawn by the renderer that is faithful to it:

- kl_rl's classic-control ports (`kl_rl.envs.classic`): gymnasium's own pygame renderer. The
  ports keep gymnasium's state layout, so each frame sets a gymnasium env's `state` (and the
  params the picture shows, such as CartPole's `length`) from the JAX state and calls its
  `render()`: the picture is gymnasium's, pixel for pixel.
- gymnax's MinAtar games: the grid drawn as MinAtar's own display draws it, one colour per
  channel from the cubehelix palette (Young and Tian 2019, arXiv 1903.03176), the last channel
  set in a cell on top, black where none is.
- Brax (every pipeline, and MJX): brax's image renderer (`brax.io.image.render_array`), which in
  Brax 0.14 is MuJoCo's offscreen `mujoco.Renderer`: it needs an OpenGL backend chosen before
  mujoco is imported (`MUJOCO_GL=egl` or `osmesa`).
- The host path (any gymnasium id): gymnasium's `rgb_array` rendering of the very copies that
  step (`FrameRecorder`). MuJoCo envs render through MuJoCo's offscreen OpenGL, as Brax does.

An episode renderer takes the recorded steps of one env (`kl_rl.rollout.Recording`, leaves
[L, ...] on the host) and yields L frames, [H, W, 3] uint8 each: frame t is the state the policy
acted on at step t.
"""

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from kl_rl.envs.classic import _ClassicEnv
from kl_rl.envs.families import BraxEnv, GymnaxEnv
from kl_rl.envs.host import HostVecEnv
from kl_rl.errors import ConfigError

EpisodeRenderer = Callable[[Any], Iterator[np.ndarray]]
"""episode(recording of one env, leaves [L, ...]) -> L frames."""

CELL_PIXELS = 16
"""The side of one MinAtar grid cell in a frame (a 10 x 10 grid: 160 x 160 pixels)."""

GL_HINT = "set MUJOCO_GL=egl (or osmesa) before Python starts (kl-rl play sets egl when it is unset)"


def renderer(env: Any, params: Any) -> EpisodeRenderer:
    """The episode renderer of a JAX-path env (a port or a family's env) under `params`.

    Raises:
      ConfigError: an env kl_rl cannot draw, naming what can be.
    """
    if isinstance(env, _ClassicEnv):
        return _gymnasium_view(env.id, params)
    if isinstance(env, GymnaxEnv) and env.id.endswith("-MinAtar"):
        return _minatar_view(tuple(env.family_env.obs_shape))
    if isinstance(env, BraxEnv):
        return _brax_view(params)
    raise ConfigError(
        f"kl-rl play cannot draw {getattr(env, 'id', type(env).__name__)}; it draws kl_rl's classic-control "
        "ports, gymnax's MinAtar games, Brax and MJX envs, and any gymnasium id on the host path"
    )


@contextlib.contextmanager
def _quiet_pygame() -> Iterator[None]:
    """While gymnasium's first render calls `pygame.init()`: SDL's dummy audio and video drivers,
    unless chosen already. pygame.init opens both, which on a machine with neither prints errors
    to stderr; an rgb_array render needs neither. The environment is restored afterwards."""
    names = ("SDL_AUDIODRIVER", "SDL_VIDEODRIVER")
    saved = {name: os.environ.get(name) for name in names}
    for name in names:
        os.environ.setdefault(name, "dummy")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)


def _gymnasium_view(env_id: str, params: Any) -> EpisodeRenderer:
    """gymnasium's renderer of `env_id`, fed the port's states (see the module docstring)."""
    import gymnasium as gym

    view = gym.make(env_id, render_mode="rgb_array").unwrapped
    for name, value in dataclasses.asdict(params).items():
        # CartPole's length and x_threshold, MountainCar's positions, Acrobot's LINK_LENGTH_1 ...
        for attr in (name, name.upper()):
            if hasattr(view, attr):
                setattr(view, attr, float(np.asarray(value)))
    torque_arrow = env_id == "Pendulum-v1"
    first = [True]

    def draw(state: np.ndarray, last_action: np.ndarray | None) -> np.ndarray:
        view.state = np.asarray(state, np.float64)
        if torque_arrow:  # Pendulum draws the torque applied by the last step (reset: none)
            view.last_u = None if last_action is None else float(np.asarray(last_action).reshape(-1)[0])
        if first[0]:
            first[0] = False
            with _quiet_pygame():
                return view.render()
        return view.render()

    def episode(recording: Any) -> Iterator[np.ndarray]:
        states, actions = np.asarray(recording.state.env_state), np.asarray(recording.action)
        for t in range(len(states)):
            yield draw(states[t], actions[t - 1] if t > 0 else None)

    return episode


def cubehelix(x: np.ndarray, gamma: float = 1.0, s: float = 0.5, r: float = -1.5, h: float = 1.0) -> np.ndarray:
    """Green's cubehelix colour scheme (arXiv 1108.5083) at x in [0, 1]: [..., 3] RGB in [0, 1].

    The defaults are matplotlib's `cubehelix` colormap, from which MinAtar's display takes its
    palette (seaborn's color_palette("cubehelix", n)).
    """
    x = np.asarray(x, np.float64)[..., None]
    xg = x**gamma
    amplitude = h * xg * (1 - xg) / 2
    phi = 2 * np.pi * (s / 3 + r * x)
    coefficients = np.array([[-0.14861, 1.78277], [-0.29227, -0.90649], [1.97294, 0.0]])
    rgb = xg + amplitude * (coefficients[:, 0] * np.cos(phi) + coefficients[:, 1] * np.sin(phi))
    return np.clip(rgb, 0.0, 1.0)


def minatar_palette(channels: int) -> np.ndarray:
    """[channels + 1, 3] uint8: black for an empty cell, then channel c's colour.

    MinAtar's display takes seaborn's color_palette("cubehelix", n): matplotlib's colormap at
    n + 2 even points with the ends cut, each read from its 256-entry table (entry i is the
    scheme at i / 255), as done here.
    """
    points = np.linspace(0, 1, channels + 2)[1:-1]
    colours = cubehelix(np.minimum((points * 256).astype(int), 255) / 255)
    return np.round(np.concatenate([np.zeros((1, 3)), colours]) * 255).astype(np.uint8)


def minatar_frame(grid: np.ndarray, palette: np.ndarray, cell: int = CELL_PIXELS) -> np.ndarray:
    """One MinAtar observation [H, W, C] (0/1 per channel) as an [H * cell, W * cell, 3] picture:
    each cell the colour of the highest channel set in it (MinAtar's display), black if none."""
    grid = np.asarray(grid) > 0.5
    index = np.max(grid * np.arange(1, grid.shape[-1] + 1), axis=-1)
    return np.repeat(np.repeat(palette[index], cell, axis=0), cell, axis=1)


def _minatar_view(shape: tuple[int, ...]) -> EpisodeRenderer:
    """MinAtar's grid in colour, drawn from the observation the policy saw."""
    palette = minatar_palette(shape[-1])

    def episode(recording: Any) -> Iterator[np.ndarray]:
        for obs in np.asarray(recording.state.obs):
            yield minatar_frame(obs.reshape(shape), palette)

    return episode


def _brax_view(system: Any, height: int = 240, width: int = 320) -> EpisodeRenderer:
    """brax's image renderer of `system` (the env's params, overrides included), through the
    model's "track" camera where it has one (Brax's locomotion envs: it follows the body), else
    MuJoCo's free camera."""
    import mujoco
    from brax.io import image

    camera = "track" if mujoco.mj_name2id(system.mj_model, mujoco.mjtObj.mjOBJ_CAMERA, "track") >= 0 else None

    def episode(recording: Any) -> Iterator[np.ndarray]:
        pipeline = recording.state.env_state.pipeline_state
        length = len(np.asarray(recording.running))
        states = [jax.tree.map(lambda x, t=t: x[t], pipeline) for t in range(length)]
        try:
            frames = image.render_array(system, states, height, width, camera)
        except Exception as err:  # MuJoCo raises its own FatalError, or ImportError for a missing GL
            raise ConfigError(f"Brax frames need MuJoCo's offscreen OpenGL, which failed ({_first_line(err)}); "
                              f"{GL_HINT}") from None  # fmt: skip
        yield from frames

    return episode


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_host_render(env: Any) -> None:
    """ConfigError unless gymnasium draws `env` (a `GymEnv`) as an rgb_array here: one copy is
    made, reset and rendered, so a missing OpenGL backend is one line before anything is played,
    not an error from inside the compiled program's host callback."""
    import gymnasium as gym

    try:
        copy = gym.make(env.id, render_mode="rgb_array")
    except TypeError as err:
        raise ConfigError(f"{env.id} cannot render: gymnasium.make does not take render_mode ({err})") from None
    try:
        copy.reset(seed=0)
        # GLFW's complaints about a missing display come as warnings before its error: the error
        # below is the one line that says what to do.
        with _quiet_pygame(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frame = copy.render()
    except Exception as err:  # MuJoCo's FatalError, a GL import error, pygame's
        raise ConfigError(f"{env.id} could not render ({_first_line(err)}); {GL_HINT}") from None
    finally:
        copy.close()
    if frame is None or np.ndim(frame) != 3:
        raise ConfigError(f"{env.id} has no rgb_array rendering (its render gave {type(frame).__name__})")


class FrameRecorder(HostVecEnv):
    """A `HostVecEnv` that also draws its copies: gymnasium's `rgb_array` render of each copy at
    reset and after every step, while its first episode runs. `frames[i]` then holds copy i's
    frames; its first L are those of the L steps of that episode (an episode still running at
    the evaluation's last step gives one frame more, of the state after it).

    Args:
      env: a `GymEnv` made with `render_mode="rgb_array"` and sync vectorization.
      num_envs: copies, one episode each.
    """

    def __init__(self, env: Any, num_envs: int):
        if env.kwargs.get("render_mode") != "rgb_array" or env.vectorization != "sync":
            raise ValueError("FrameRecorder needs a sync GymEnv made with render_mode='rgb_array'")
        super().__init__(env, num_envs)
        self.frames: list[list[np.ndarray]] = []
        self._running = np.zeros(0, bool)

    def _render(self, copy: int) -> np.ndarray:
        with _quiet_pygame():
            return np.asarray(self._vec.envs[copy].render(), np.uint8)

    def _reset(self, key_data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = super()._reset(key_data)
        self._running = np.ones(self._vec.num_envs, bool)
        self.frames = [[self._render(i)] for i in range(self._vec.num_envs)]
        return out

    def _step(self, action: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, ...]:
        out = super()._step(action, index)
        terminated, truncated = out[2], out[3]
        self._running &= ~(terminated | truncated).reshape(-1)
        for i in np.flatnonzero(self._running):
            self.frames[i].append(self._render(i))
        return out
