"""`kl-rl play` and kl_rl.video: videos of a run's policy, decoded back and counted.

The runs are tiny (one PPO update of 2 envs x 16 steps): what is checked is how episodes become
frames and files, not how well the policy plays.
"""

import json
import re
import sys

import gymnasium as gym
import imageio
import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

import kl_rl
from kl_rl import rollout, runfolder, video
from kl_rl.cli import main
from kl_rl.envs import render
from kl_rl.envs.vector import VecEnvState
from tests.cli_checks import assert_one_line_error

pytestmark = pytest.mark.xdist_group("test_video")

TINY = dict(total_steps=32, num_envs=2, num_steps=16, update_epochs=1, num_minibatches=1, eval_episodes=2)
ENVS = {  # name: (env id, env path)
    "cartpole": ("CartPole-v1", "auto"),
    "pendulum": ("Pendulum-v1", "auto"),
    "minatar": ("gymnax/Breakout-MinAtar", "auto"),
    "host": ("CartPole-v1", "host"),
}


class _Runs(dict):
    """{name: run folder} of one-update PPO runs, written as `kl-rl train` writes them; each is
    trained when a test first asks for it (the slow tier's host run costs the default tier nothing)."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, name):
        env, path = ENVS[name]
        result = kl_rl.run("ppo", env, seeds=1 if name != "cartpole" else 2, env_path=path, **TINY)
        self[name] = result.save(self.root / name)
        return self[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _Runs(tmp_path_factory.mktemp("runs"))


def _gif_frames(path) -> tuple[np.ndarray, list[int]]:
    """A GIF's decoded frames and each one's duration in ms."""
    frames = iio.imread(path, index=None)
    image, durations = Image.open(path), []
    for i in range(image.n_frames):
        image.seek(i)
        durations.append(image.info["duration"])
    return frames, durations


def _runs_of_same(frames: np.ndarray) -> list[int]:
    """Lengths of the runs of identical consecutive frames."""
    changed = np.flatnonzero(np.any(frames[1:] != frames[:-1], axis=(1, 2, 3))) + 1
    return np.diff(np.concatenate([[0], changed, [len(frames)]])).tolist()


# The host path's play in the slow tier: the default tier's three JAX-path envs run the same
# writing and counting code; the host path adds gymnasium's own rgb_array frames.
@pytest.mark.parametrize("name", [n if n != "host" else pytest.param(n, marks=pytest.mark.slow) for n in ENVS])
def test_play_writes_an_mp4_and_a_gif_with_a_frame_per_step(runs, name, tmp_path, capsys):
    episodes = 1 if name == "pendulum" else 2  # Pendulum's episodes are always 200 steps
    steps = {}
    for suffix in ("mp4", "gif"):
        out = tmp_path / f"{name}.{suffix}"
        assert main(["play", str(runs[name]), "--video", str(out), "--episodes", str(episodes), "--fps", "50"]) == 0
        printed = capsys.readouterr().out
        lengths = [int(n) for n in re.search(r"steps ([\d, ]+)", printed).group(1).split(", ")]
        assert len(lengths) == episodes and all(n >= 1 for n in lengths)
        steps[suffix] = sum(lengths)
        assert f"{out}: {steps[suffix]} frames at 50 fps" in printed
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    assert steps["mp4"] == steps["gif"]  # the same episodes: same key, same policy

    reader = imageio.get_reader(tmp_path / f"{name}.mp4")
    decoded = [frame for frame in reader]  # noqa: C416 (list() asks the reader's length: inf for ffmpeg)
    assert reader.get_meta_data()["codec"] == "h264" and reader.get_meta_data()["fps"] == 50
    assert len(decoded) == steps["mp4"]
    gif, durations = _gif_frames(tmp_path / f"{name}.gif")
    # A GIF stores a run of identical frames once, shown for the run's time: every step is there.
    assert sum(durations) == 20 * steps["gif"]
    assert len(gif) <= steps["gif"] and gif.shape[1:] == decoded[0].shape


def test_the_frames_from_python_are_the_files_frames(runs, tmp_path):
    playback = video.play(runs["minatar"], episodes=2)
    frames = playback.array()
    assert frames.shape == (playback.steps, 160, 160, 3) and frames.dtype == np.uint8
    assert playback.steps == int(playback.lengths.sum())
    assert video.write(tmp_path / "m.gif", frames, fps=25) == playback.steps
    gif, durations = _gif_frames(tmp_path / "m.gif")
    runs_of_same = _runs_of_same(frames)
    # MinAtar pictures have a handful of colours: the GIF holds them exactly.
    np.testing.assert_array_equal(gif, frames[np.cumsum([0, *runs_of_same[:-1]])])
    assert durations == [40 * n for n in runs_of_same]


def test_play_replays_the_seeds_final_evaluation(runs):
    summary = json.loads((runs["cartpole"] / "summary.json").read_text())
    loaded = runfolder.load(runs["cartpole"])
    for seed in (0, 1):
        playback = video.play(loaded, seed=seed, episodes=loaded.config.eval_episodes)
        assert playback.returns.mean() == np.float32(summary["final_return"][seed])
        # CartPole's reward is 1 per step: each episode's return is its length, its frame count.
        np.testing.assert_array_equal(playback.returns, playback.lengths)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1", "Acrobot-v1", "MountainCar-v0",
                                    "MountainCarContinuous-v0"])  # fmt: skip
def test_a_ports_frames_are_gymnasiums_pictures_of_the_same_states(env_id):
    """gymnasium steps its own env; the port's renderer is fed those states: the same pictures,
    the params a picture shows (CartPole's pole length) included."""
    port = kl_rl.envs.make(env_id)
    params = port.default_params
    if env_id == "CartPole-v1":
        params = params.replace(length=1.0)
    reference = gym.make(env_id, render_mode="rgb_array").unwrapped
    if env_id == "CartPole-v1":
        reference.length = 1.0
    reference.reset(seed=3)
    reference.action_space.seed(3)
    states, actions, pictures = [], [], []
    for _t in range(5):
        # The port's states are float32: gymnasium draws the same values.
        states.append(np.array(reference.state, np.float32))
        reference.state = states[-1].astype(np.float64)
        pictures.append(reference.render())
        action = reference.action_space.sample()
        actions.append(np.asarray(action))
        reference.step(action)
    env_state = np.stack(states)
    recording = rollout.Recording(VecEnvState(env_state, env_state, None, None, None), np.stack(actions),
                                  np.ones(5, bool))  # fmt: skip
    drawn = list(render.renderer(port, params)(recording))
    assert len(drawn) == 5
    for ours, theirs in zip(drawn, pictures, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_the_minatar_palette_is_matplotlibs_cubehelix_and_cells_take_the_top_channel():
    import matplotlib

    table = np.arange(256)  # matplotlib's colormap holds the scheme at i / 255
    cubehelix = matplotlib.colormaps["cubehelix"]
    np.testing.assert_allclose(render.cubehelix(table / 255), cubehelix(table)[:, :3], atol=1e-12)
    palette = render.minatar_palette(4)
    # seaborn's color_palette("cubehelix", 4), which MinAtar's display uses, as seaborn computes it
    seaborn = cubehelix(np.linspace(0, 1, 6)[1:-1])[:, :3]
    np.testing.assert_array_equal(palette[1:], np.round(seaborn * 255).astype(np.uint8))
    assert palette.shape == (5, 3) and palette[0].tolist() == [0, 0, 0]
    grid = np.zeros((10, 10, 4))
    grid[2, 3, 0] = 1
    grid[5, 5, [1, 3]] = 1  # two channels in one cell: the last is drawn
    frame = render.minatar_frame(grid, palette, cell=2)
    assert frame.shape == (20, 20, 3)
    assert frame[4:6, 6:8].tolist() == [[palette[1].tolist()] * 2] * 2
    assert frame[10, 10].tolist() == palette[4].tolist()
    assert frame[0, 0].tolist() == [0, 0, 0]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(runs, tmp_path, capsys, monkeypatch):
    run = str(runs["cartpole"])
    target = tmp_path / "v.mp4"

    def check(argv, *needles):
        capsys.readouterr()
        assert_one_line_error(capsys, main(argv), *needles)
        assert list(tmp_path.iterdir()) == []

    check(["play", str(tmp_path), "--video", str(target)], "not a kl-rl train run folder")
    check(["play", str(tmp_path / "nowhere"), "--video", str(target)], "does not exist")
    check(["play", run, "--video", str(tmp_path / "v.avi")], "unsupported video format '.avi'", ".mp4 or .gif")
    check(["play", run], "needs --video")
    check(["play", run, "--video", str(target), "--seed", "7"], "no --seed 7", "0, 1")
    check(["play", run, "--video", str(target), "--episodes", "0"], "--episodes must be a positive integer")
    check(["play", run, "--video", str(target), "--fps", "-1"], "--fps must be positive")
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    check(["play", run, "--video", str(target)], "needs imageio-ffmpeg", "pip install 'kl_rl[video]'")
    monkeypatch.setitem(sys.modules, "PIL", None)
    check(["play", run, "--video", str(tmp_path / "v.gif")], "needs pillow", "pip install 'kl_rl[video]'")


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    """W&B in offline mode under tmp_path; yields its wandb/ folder (tests/wandb_files.py)."""
    from tests.wandb_files import offline_mode

    yield from offline_mode(tmp_path, monkeypatch)


def test_play_wandb_logs_the_video_beside_the_seeds_runs(runs, tmp_path, wandb_dir, capsys):
    from tests.wandb_files import read_runs

    out = tmp_path / "play.gif"
    assert main(["play", str(runs["cartpole"]), "--video", str(out), "--seed", "1", "--wandb", "kl-rl-test"]) == 0
    assert "logged the video to W&B project 'kl-rl-test', group 'cartpole'" in capsys.readouterr().out
    (run,) = read_runs(wandb_dir)
    assert (run["group"], run["name"], run["job_type"]) == ("cartpole", "cartpole-play-seed1", "play")
    assert run["config"]["seed"] == 1 and run["config"]["episodes"] == 1
    (row,) = run["history"]
    (logged,) = wandb_dir.glob(f"offline-run-*-{run['id']}/files/{row['video']['path']}")
    assert logged.read_bytes() == out.read_bytes()
    # A bad project name is refused before anything is played or written.
    capsys.readouterr()
    assert_one_line_error(capsys, main(["play", str(runs["cartpole"]), "--video", str(tmp_path / "b.gif"),
                                        "--wandb", "a/b"]), "W&B project name")  # fmt: skip
    assert not (tmp_path / "b.gif").exists()


@pytest.mark.parametrize("suffix", ["mp4", "gif"])
def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path, suffix):
    target = tmp_path / f"v.{suffix}"
    target.write_bytes(b"old")

    def frames():
        for i in range(3):
            yield np.full((8, 8, 3), 40 * i, np.uint8)
        raise RuntimeError("renderer failed")

    with pytest.raises(RuntimeError, match="renderer failed"):
        video.write(target, frames(), fps=10)
    assert [p.name for p in tmp_path.iterdir()] == [target.name] and target.read_bytes() == b"old"
    # An odd-sized frame is padded to even sides for yuv420p; the count is the frames given.
    assert video.write(target, [np.zeros((7, 9, 3), np.uint8)] * 4, fps=10) == 4
    assert len(iio.imread(target, index=None)) in (1, 4)  # a GIF merges the 4 identical frames


BRAX_FRAMES = """
import sys
import jax, jax.numpy as jnp, numpy as np
from kl_rl import envs, rollout
from kl_rl.envs import render
from kl_rl.errors import ConfigError

env = envs.make("brax/hopper")
vec = envs.VecEnv(env, 1)
first = jax.jit(vec.reset)(jax.random.key(0))  # no step compiled: the hopper is moved by hand
state = jax.tree.map(lambda x: jnp.repeat(x, 4, axis=0), first)
pipeline = state.env_state.pipeline_state
q = pipeline.q.at[:, 2].add(jnp.linspace(0.0, 0.9, 4))  # the torso tilts further each frame
state = state.replace(env_state=state.env_state.replace(pipeline_state=pipeline.replace(q=q)))
recording = rollout.Recording(state, jnp.zeros((4, 3)), jnp.ones(4, bool))
try:
    frames = np.stack(list(render.renderer(env, vec.params)(recording)))
except ConfigError as err:
    print("ConfigError:", err)
    sys.exit(2)
np.save(sys.argv[1], frames)
"""


@pytest.mark.slow
def test_brax_frames_come_from_brax_s_renderer_through_egl_or_say_what_is_missing(tmp_path):
    """Brax 0.14's image renderer is MuJoCo's offscreen renderer: with MUJOCO_GL=egl it draws
    (Mesa's libEGL here); with GLFW and no display it is one ConfigError naming MUJOCO_GL."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    out = tmp_path / "frames.npy"
    done = subprocess.run([sys.executable, "-c", BRAX_FRAMES, str(out)], env={**env, "MUJOCO_GL": "egl"},
                          check=False, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    frames = np.load(out)
    assert frames.shape == (4, 240, 320, 3) and frames.dtype == np.uint8
    assert frames.std() > 10 and np.any(frames[0] != frames[3])  # a picture, and the body tilted
    without_display = {**env, "MUJOCO_GL": "glfw", "DISPLAY": ""}
    done = subprocess.run([sys.executable, "-c", BRAX_FRAMES, str(out)], env=without_display,
                          check=False, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr[-2000:]
    assert "ConfigError: Brax frames need MuJoCo's offscreen OpenGL" in done.stdout and "MUJOCO_GL=egl" in done.stdout


@pytest.mark.slow
def test_a_mujoco_env_on_the_host_path_plays_with_egl_set_by_kl_rl_play(tmp_path):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}  # play sets egl itself
    run_dir, target = tmp_path / "hopper", tmp_path / "hopper.mp4"
    tiny = ["--total-steps", "32", "--num-envs", "2", "--num-steps", "16", "--update-epochs", "1",
            "--num-minibatches", "1", "--eval-episodes", "1"]  # fmt: skip
    cli = [sys.executable, "-m", "kl_rl.cli"]
    train = [*cli, "train", "--algo", "ppo", "--env", "Hopper-v5", *tiny, "--out", str(run_dir), "--no-progress"]
    done = subprocess.run(train, env=env, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run([*cli, "play", str(run_dir), "--video", str(target)], env=env, check=False,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    steps = int(re.search(r"steps (\d+)", done.stdout).group(1))
    count, first = 0, None
    for frame in imageio.get_reader(target):  # one at a time (list() would ask its length: inf for ffmpeg)
        first = frame if first is None else first
        count += 1
    assert count == steps and first.shape == (480, 480, 3) and np.std(first) > 10
