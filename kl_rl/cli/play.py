"""`kl-rl play`: a video of a trained policy acting, as MP4 or GIF (`kl_rl.video`)."""

import os

from kl_rl.cli.common import Parser, add_flags
from kl_rl.errors import ConfigError

USAGE = """usage: kl-rl play RUN_DIR --video FILE.mp4|FILE.gif [--seed S] [--episodes N] [--fps F] [--stochastic]
                  [--wandb PROJECT]

Plays the run's final policy of seed S (default: its first) for N episodes (default 1), each from
its own reset, and writes every step as a frame: MP4 (H.264) or GIF, at F frames a second
(default: the env's own rate, e.g. 50 for CartPole-v1). Actions are the evaluation's (the mode;
--stochastic samples), and the episodes start from the key of the seed's final evaluation, so
with N equal to the run's eval_episodes they are the episodes behind summary.json's returns.

Drawn: kl_rl's classic-control ports (gymnasium's renderer fed the JAX state), gymnax's MinAtar
games (the grid in colour), Brax and MJX envs (brax's image renderer), and any gymnasium id on the
host path (gymnasium's rgb_array). MuJoCo-drawn envs need an offscreen OpenGL: MUJOCO_GL=egl,
set here when unset. Needs the video extra: pip install 'kl_rl[video]'.

--wandb PROJECT also logs the video as one W&B run in the group named after the run folder,
beside its seeds' runs from kl-rl train --wandb (the wandb extra; WANDB_MODE=offline logs locally)."""


def main(argv: list[str]) -> int:
    """`kl-rl play RUN_DIR --video FILE`: plays the policy, writes the video, prints its path and episodes.

    Raises:
      ConfigError: no run folder, not a run folder, an unsupported video suffix, the video extra
        missing, a seed the run does not have, an env that cannot be drawn (one line; nothing written).
    """
    parser = Parser(prog="kl-rl play", add_help=False)
    parser.add_argument("run_dir", nargs="?")
    add_flags(parser, video=None, seed=None, episodes="1", fps=None, wandb=None)
    parser.add_argument("--stochastic", action="store_true")
    parser.add_argument("-h", "--help", action="store_true")
    args = parser.parse_args(argv)
    if args.help:
        print(USAGE)
        return 0
    if args.run_dir is None:
        raise ConfigError("kl-rl play needs a run folder (see kl-rl play --help)")
    if args.video is None:
        raise ConfigError("kl-rl play needs --video FILE.mp4 or FILE.gif")
    # Before mujoco is imported (by a Brax env or a gymnasium MuJoCo env): its OpenGL backend is
    # chosen then, and on a machine with no display only an offscreen one works.
    os.environ.setdefault("MUJOCO_GL", "egl")
    from kl_rl import config as config_lib
    from kl_rl import logging_wandb, video

    path = video.check_video_path(args.video)
    if args.wandb is not None:
        logging_wandb.check(args.wandb)
    seed = None if args.seed is None else config_lib.parse_value("seed", args.seed, int)
    episodes = config_lib.parse_value("episodes", args.episodes, int)
    fps = None if args.fps is None else config_lib.parse_value("fps", args.fps, float)
    if fps is not None and not fps > 0:
        raise ConfigError(f"--fps must be positive, got {args.fps}")
    playback = video.play(args.run_dir, seed=seed, episodes=episodes, stochastic=args.stochastic)
    count = video.write(path, playback.frames(), fps or playback.fps)
    returns = ", ".join(f"{r:.2f}" for r in playback.returns)
    lengths = ", ".join(str(int(n)) for n in playback.lengths)
    print(f"seed {playback.seed}: {len(playback.lengths)} episode(s), return {returns}, steps {lengths}")
    print(f"{path}: {count} frames at {fps or playback.fps:g} fps")
    if args.wandb is not None:
        group = os.path.basename(os.path.normpath(args.run_dir))
        config = {"seed": playback.seed, "episodes": len(playback.lengths), "stochastic": args.stochastic,
                  "returns": [float(r) for r in playback.returns]}  # fmt: skip
        logging_wandb.log_video(args.wandb, group, path, name=f"{group}-play-seed{playback.seed}", config=config)
        print(f"logged the video to W&B project {args.wandb!r}, group {group!r}")
    return 0
