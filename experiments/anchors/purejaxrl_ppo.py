"""Times PureJaxRL's `ppo.py` (CartPole-v1, its default config) for a side-by-side benchmark.

None of PureJaxRL's code is in this repository: this script imports it from a checkout.
Setup, outside the repo (gymnax 1.0.1 needs gymnasium<1.4, so it gets its own venv):

    git clone https://github.com/luchris429/purejaxrl /work/anchors/purejaxrl   # commit 31756b1
    python3 -m venv /work/anchors/venv
    /work/anchors/venv/bin/pip install jax==0.10.2 jaxlib==0.10.2 gymnax==1.0.1 flax optax distrax

PureJaxRL's wrappers.py imports brax and navix at module level for envs this benchmark does
not use; they are replaced by empty stand-in modules so those heavy packages need not be
installed. PureJaxRL was written against gymnax 0.0.x, whose `step` returned
(obs, state, reward, done, info) with done = terminated or truncated; gymnax 1.0 returns six
values, so `step` is adapted back to the five PureJaxRL expects. Prints one JSON line.
"""

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path


def _stub_unused_modules() -> None:
    for name in ("brax", "brax.envs", "brax.envs.wrappers", "brax.envs.wrappers.training", "navix"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["brax"].envs = sys.modules["brax.envs"]
    sys.modules["brax.envs.wrappers.training"].EpisodeWrapper = object
    sys.modules["brax.envs.wrappers.training"].AutoResetWrapper = object


def _adapt_gymnax_step() -> None:
    import jax.numpy as jnp
    from gymnax.environments import environment

    six_value_step = environment.Environment.step

    def step(self, key, state, action, params=None):
        obs, state, reward, terminated, truncated, info = six_value_step(self, key, state, action, params)
        return obs, state, reward, jnp.logical_or(terminated, truncated), info

    environment.Environment.step = step


CONFIG = {
    "LR": 2.5e-4,
    "NUM_ENVS": 4,
    "NUM_STEPS": 128,
    "TOTAL_TIMESTEPS": 5e5,
    "UPDATE_EPOCHS": 4,
    "NUM_MINIBATCHES": 4,
    "GAMMA": 0.99,
    "GAE_LAMBDA": 0.95,
    "CLIP_EPS": 0.2,
    "ENT_COEF": 0.01,
    "VF_COEF": 0.5,
    "MAX_GRAD_NORM": 0.5,
    "ACTIVATION": "tanh",
    "ENV_NAME": "CartPole-v1",
    "ANNEAL_LR": True,
    "DEBUG": False,
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--purejaxrl-dir", required=True)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--total-timesteps", type=float, default=5e5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    src = Path(args.purejaxrl_dir) / "purejaxrl"
    if not (src / "ppo.py").is_file():
        print(f"error: no purejaxrl/ppo.py under {args.purejaxrl_dir!r}; clone PureJaxRL there", file=sys.stderr)
        return 2
    _stub_unused_modules()
    _adapt_gymnax_step()
    sys.path.insert(0, str(src))
    import jax
    import numpy as np
    from ppo import make_train

    config = {**CONFIG, "TOTAL_TIMESTEPS": args.total_timesteps}
    train = make_train(config)
    keys = jax.random.split(jax.random.PRNGKey(30), args.seeds)
    start = time.perf_counter()
    compiled = jax.jit(jax.vmap(train)).lower(keys).compile()
    compile_s = time.perf_counter() - start
    run_s = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(keys))
        run_s.append(time.perf_counter() - start)
    info = out["metrics"]
    # Mean return of the episodes that ended in the last update, per seed.
    ended = np.asarray(info["returned_episode"][:, -1])
    returns = np.asarray(info["returned_episode_returns"][:, -1])
    last = [float(returns[s][ended[s]].mean()) if ended[s].any() else float("nan") for s in range(args.seeds)]
    steps = args.seeds * (int(config["TOTAL_TIMESTEPS"]) // (config["NUM_ENVS"] * config["NUM_STEPS"])) * config["NUM_ENVS"] * config["NUM_STEPS"]
    print(
        json.dumps(
            {
                "impl": "purejaxrl",
                "seeds": args.seeds,
                "total_timesteps": int(config["TOTAL_TIMESTEPS"]),
                "compile_s": round(compile_s, 2),
                "run_s": [round(t, 3) for t in run_s],
                "env_steps_per_s": round(steps / statistics.median(run_s)),
                "last_train_return_median": float(np.nanmedian(last)),
                "jax": jax.__version__,
                "device": str(jax.devices()[0].device_kind),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
