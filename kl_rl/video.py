"""Watching a trained policy: its episodes as frames, and as an MP4 or GIF (`kl-rl play`).

The episodes are played by the evaluation's own loop (`kl_rl.rollout.record`, the same steps as
`rollout.evaluate`) with the evaluation's policy (`kl_rl.train.eval_policy`: the mode unless
`stochastic`), from the key a seed's final evaluation used. So with as many episodes as the
run evaluated, they are the very episodes behind summary.json's final returns. Each step is then
drawn by the env's renderer (`kl_rl.envs.render`): frame t of an episode is the state the policy
acted on at step t, so an episode of L steps gives L frames.

    >>> run = kl_rl.runfolder.load("runs/ppo-cartpole")
    >>> frames = kl_rl.video.frames(run, seed=0, episodes=2)  # [T, H, W, 3] uint8, T steps played
    >>> kl_rl.video.write("cartpole.gif", frames, fps=50)

Files are written with imageio (`pip install 'kl_rl[video]'`; imageio-ffmpeg brings its own
ffmpeg), into a temporary sibling renamed over the target once complete. MP4 is H.264 in
yuv420p (frames padded to even sizes), which every player opens: one video frame per step. A GIF
(Pillow's writer) shows every step too, but stores a run of identical frames as one frame shown
for their summed duration, so it decodes to fewer frames where the picture stood still.

MuJoCo-drawn envs (gymnasium's MuJoCo envs on the host path, Brax and MJX) need an offscreen
OpenGL backend chosen before mujoco is imported: `MUJOCO_GL=egl` (Mesa's or a GPU's libEGL) or
`osmesa`. `kl-rl play` sets `MUJOCO_GL=egl` when it is unset.
"""

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from kl_rl import envs, rollout, runfolder, train
from kl_rl.agents import algo_spec
from kl_rl.errors import ConfigError

VIDEO_SUFFIXES = (".mp4", ".gif")
_PACKAGES = {"imageio": "imageio", "imageio_ffmpeg": "imageio-ffmpeg", "PIL": "pillow"}
MINATAR_FPS = 15
"""MinAtar has no clock of its own; 15 steps a second is easy to follow."""


@dataclasses.dataclass
class Playback:
    """Episodes of one seed's policy, played and ready to draw.

    Attributes:
      seed: the run's seed whose policy acted.
      returns: [episodes] undiscounted returns.
      lengths: [episodes] steps played, each one frame.
      fps: the env's own frame rate where it has one (gymnasium's render_fps, Brax's 1 / dt).
    """

    seed: int
    returns: np.ndarray
    lengths: np.ndarray
    fps: float
    draw: Callable[[int], Iterator[np.ndarray]]
    """draw(episode) -> that episode's frames, [H, W, 3] uint8 each."""

    @property
    def steps(self) -> int:
        """Steps played over all episodes: the number of frames."""
        return int(self.lengths.sum())

    def frames(self) -> Iterator[np.ndarray]:
        """Every episode's frames in order, drawn one at a time (a long video needs no memory)."""
        for episode in range(len(self.lengths)):
            yield from self.draw(episode)

    def array(self) -> np.ndarray:
        """[steps, H, W, 3] uint8: all frames at once, for mediapy or matplotlib in a notebook."""
        return np.stack(list(self.frames()))


def play(
    run: "runfolder.LoadedRun | str | os.PathLike",
    seed: int | None = None,
    episodes: int = 1,
    stochastic: bool = False,
    key: jax.Array | None = None,
) -> Playback:
    """Plays `episodes` episodes of one seed's policy and returns them, drawable.

    Args:
      run: a loaded run (`kl_rl.runfolder.load`) or its folder.
      seed: the run's seed whose policy acts (default: its first).
      episodes: how many episodes, played side by side, each from its own reset.
      stochastic: sample actions instead of the evaluation's choice (the mode by default).
      key: the episodes' PRNG key; default the seed's final-evaluation key, so `episodes` equal to
        the run's eval_episodes replays its final evaluation.

    Raises:
      ConfigError: not a run folder, a seed the run does not have, a bad episode count, or an
        env kl_rl cannot draw (before anything is played).
    """

    if not isinstance(episodes, int) or episodes < 1:
        raise ConfigError(f"{{episodes}} must be a positive integer, got {episodes!r}", "episodes")
    if not isinstance(run, runfolder.LoadedRun):
        run = runfolder.load(run)
    seed = run.seeds[0] if seed is None else seed
    if seed not in run.seeds:
        raise ConfigError(f"the run has no {{seed}} {seed}; its seeds: {', '.join(map(str, run.seeds))}", "seed")
    deterministic = run.config.eval_deterministic and not stochastic
    program = _program(run, episodes, deterministic)
    if key is None:
        key = jax.random.split(jax.random.key(seed))[1]
    state = run.seed_state(seed)
    host = program.draw_episode is None
    try:
        returns, recording = jax.device_get(program.run(key, state.agent, state.collector.obs_norm))
    finally:
        if host:
            program.vec_env.close()
    recorded = program.vec_env.frames if host else None  # a later play's reset starts new lists
    lengths = np.asarray(recording.running).sum(axis=0)

    def draw(episode: int) -> Iterator[np.ndarray]:
        length = int(lengths[episode])
        if host:
            yield from recorded[episode][:length]
        else:
            yield from program.draw_episode(jax.tree.map(lambda x: x[:length, episode], recording))

    return Playback(seed, np.asarray(returns), lengths, program.fps, draw)


class _Program(NamedTuple):
    run: Callable[..., Any]
    """run(key, agent_state, obs_norm) -> (returns, recording), compiled."""
    vec_env: Any
    draw_episode: Callable[[Any], Iterator[np.ndarray]] | None
    """The JAX path's renderer; None on the host path, whose `vec_env` records the frames."""
    fps: float


_PROGRAMS: dict[str, _Program] = {}
_KEEP = 8


def _program(run: "runfolder.LoadedRun", episodes: int, deterministic: bool) -> _Program:
    """The compiled episodes of a run's policy, its env copies and renderer: kept for the last few
    (algo, env, config, episodes) asked for, so playing a run again (another seed, another file,
    a notebook cell run twice) does not compile again.

    Raises:
      ConfigError: an env kl_rl cannot draw.
    """
    from kl_rl import config as config_lib
    from kl_rl.envs import render

    config, spec = run.config, run.config.rollout
    host = run.trainer.env_path == "host"
    fields = json.dumps(config_lib.to_dict(config), sort_keys=True, default=str)
    name = f"{run.algo} {run.env_id} {host} {episodes} {deterministic} {fields}"
    if name in _PROGRAMS:
        return _PROGRAMS[name]
    if host:
        gym_env = envs.GymEnv(run.env_id, "sync", render_mode="rgb_array")
        render.check_host_render(gym_env)
        vec_env = render.FrameRecorder(gym_env, episodes)
        draw_episode, fps = None, _gymnasium_fps(run.env_id)
    else:
        env = run.trainer.vec_env.env
        vec_env = envs.vectorize(env, episodes, evaluation=True)
        if spec.env_params and config.env_params:
            vec_env = vec_env.with_params(config.env_params)
        draw_episode, fps = render.renderer(env, vec_env.params), _fps(env)
    max_steps = vec_env.max_episode_steps or 1000  # as the run's evaluation (kl_rl.train.make_trainer)
    agent = algo_spec(run.algo).make(config, vec_env.observation_space, vec_env.action_space)

    @jax.jit
    def episodes_of(key, agent_state, obs_norm):
        policy = train.eval_policy(agent, agent_state, deterministic)
        initial = None if agent.initial_state is None else agent.initial_state(vec_env.num_envs)
        return rollout.record(key, policy, vec_env, obs_norm, spec.normalize_obs, max_steps, initial_state=initial)

    while len(_PROGRAMS) >= _KEEP:
        del _PROGRAMS[next(iter(_PROGRAMS))]
    _PROGRAMS[name] = _Program(episodes_of, vec_env, draw_episode, fps)
    return _PROGRAMS[name]


def frames(run: "runfolder.LoadedRun | str | os.PathLike", **kwargs: Any) -> np.ndarray:
    """[steps, H, W, 3] uint8 frames of `play(run, **kwargs)`'s episodes, one after another."""
    return play(run, **kwargs).array()


def _gymnasium_fps(env_id: str) -> float:
    import gymnasium as gym

    fps = gym.make(env_id).metadata.get("render_fps")
    return float(fps) if fps else 30.0


def _fps(env: Any) -> float:
    """The frame rate at which the env's steps play in real time, where it has one."""
    from kl_rl.envs.families import BraxEnv, GymnaxEnv

    if isinstance(env, BraxEnv):
        return float(1.0 / env.family_env.dt)
    if isinstance(env, GymnaxEnv):
        return float(MINATAR_FPS)
    return _gymnasium_fps(env.id)


def check_video_path(path: str | os.PathLike) -> Path:
    """`path` if its suffix names a format `write` writes and the `video` extra is installed.

    Raises:
      ConfigError: another suffix, a folder, or imageio (or, for MP4, imageio-ffmpeg) missing.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ConfigError(
            f"{{video}} {str(path)!r}: unsupported video format {path.suffix or '(no extension)'!r}; "
            "name a .mp4 or .gif file",
            "video",
        )
    if path.is_dir():
        raise ConfigError(f"{{video}} {str(path)!r} is a folder; name a .mp4 or .gif file", "video")
    needs = ["imageio", "imageio_ffmpeg"] if suffix == ".mp4" else ["PIL"]
    for module in needs:
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(
                f"writing {suffix} needs {_PACKAGES[module]}; install it with pip install 'kl_rl[video]'"
            ) from None
    return path


def write(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float = 30.0) -> int:
    """Writes frames ([H, W, 3] uint8 each) to an MP4 or GIF file, atomically.

    The file is written into a temporary sibling and renamed over `path` only once complete, so
    a failure (a renderer's error, an interrupt) leaves nothing half-written.

    Returns:
      The number of frames written.

    Raises:
      ConfigError: see `check_video_path`; no frames; fps not positive.
    """
    path = check_video_path(path)
    if not fps > 0:
        raise ConfigError(f"{{fps}} must be positive, got {fps}", "fps")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        count = (_write_mp4 if path.suffix.lower() == ".mp4" else _write_gif)(tmp, frames, fps)
        if count == 0:
            raise ConfigError(f"no frames to write to {path}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def _write_mp4(path: Path, frames: Iterable[np.ndarray], fps: float) -> int:
    """H.264 in yuv420p through imageio's ffmpeg writer, one frame at a time."""
    import imageio

    count = 0
    writer = imageio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p",
                                macro_block_size=1, ffmpeg_log_level="error")  # fmt: skip
    try:
        with warnings.catch_warnings():
            # imageio-ffmpeg starts ffmpeg with subprocess, which JAX's fork warning flags; the
            # child execs ffmpeg at once, which is what that warning says is safe.
            warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
            for frame in frames:
                writer.append_data(_even(np.asarray(frame, np.uint8)))
                count += 1
    finally:
        # Closed on an error too: imageio's own `with` skips the close then, and ffmpeg would
        # finish the file later, after `write` removed it.
        writer.close()
    return count


def _write_gif(path: Path, frames: Iterable[np.ndarray], fps: float) -> int:
    """A looping GIF through Pillow, each frame with its own palette (`palette_image`)."""
    images = [palette_image(np.asarray(frame, np.uint8)) for frame in frames]
    if images:
        images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=1000.0 / fps, loop=0)
    return len(images)


def palette_image(frame: np.ndarray) -> Any:
    """An [H, W, 3] uint8 frame as a Pillow palette image: exact when it has at most 256 colours
    (the classic-control and MinAtar pictures), else Pillow's fast octree quantization (what
    imageio's own GIF writer does with its default median cut, at about a tenth of the time)."""
    from PIL import Image

    packed = (frame[..., 0].astype(np.uint32) << 16) | (frame[..., 1].astype(np.uint32) << 8) | frame[..., 2]
    colours, index = np.unique(packed.reshape(-1), return_inverse=True)
    if len(colours) > 256:
        return Image.fromarray(frame).quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    image = Image.fromarray(index.reshape(frame.shape[:2]).astype(np.uint8), mode="P")
    rgb = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], axis=1).astype(np.uint8)
    image.putpalette(rgb.reshape(-1).tolist())
    return image


def _even(frame: np.ndarray) -> np.ndarray:
    """The frame padded by its last row and column to even sides (yuv420p halves both)."""
    pad = ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0))
    return np.pad(frame, pad, mode="edge") if any(p[1] for p in pad[:2]) else frame
