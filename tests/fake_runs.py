"""Small run and sweep folders written by hand, laid out as kl_rl.runner and kl_rl.sweep write them.

Values follow closed forms so tests can assert numbers:
  episode_return = 10 * update + 2 * seed + 5 * point (+ offset)
  kl             = kl_base * (1 + 0.1 * seed), the same at every update
  eval_return    = the final update's episode_return + 1, on the final row only
"""

import csv
import itertools
import json
from pathlib import Path
from typing import Any


def episode_return(update: int, seed: int, point: int = 0, offset: float = 0.0) -> float:
    return 10.0 * update + 2.0 * seed + 5.0 * point + offset


def _metrics(update: int, seed: int, point: int, steps_per_update: int, kl_base: float, offset: float) -> dict:
    ret = episode_return(update, seed, point, offset)
    return {
        "env_steps": update * steps_per_update,
        "episode_return": ret,
        "episode_length": ret,
        "kl": kl_base * (1 + 0.1 * seed),
        "entropy": 0.5,
        "pg_loss": -0.01,
        "vf_loss": 1.0,
        "clip_frac": 0.1,
        "lr": 1e-3 * (1 - (update - 1) / 100),
    }


def _write(folder: Path, config: dict, rows: list[dict], summary: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def write_train_run(
    folder: Path,
    algo: str = "ppo",
    env: str = "CartPole-v1",
    seeds: int = 3,
    updates: int = 8,
    steps_per_update: int = 256,
    wall_time_s: float = 2.0,
    kl_base: float = 0.01,
    offset: float = 0.0,
) -> Path:
    """A `kl-rl train` folder (without checkpoints/)."""
    rows = []
    for seed in range(seeds):
        for u in range(1, updates + 1):
            row: dict[str, Any] = {"seed": seed, "update": u}
            row.update(_metrics(u, seed, 0, steps_per_update, kl_base, offset))
            row["eval_return"] = episode_return(u, seed, 0, offset) + 1 if u == updates else ""
            rows.append(row)
    final = [episode_return(updates, s, 0, offset) + 1 for s in range(seeds)]
    total_steps = updates * steps_per_update
    config = {"algo": algo, "env": env, "seeds": list(range(seeds)), "lr": 1e-3, "total_steps": total_steps}
    summary = {
        "algo": algo,
        "env": env,
        "seeds": list(range(seeds)),
        "total_env_steps": updates * steps_per_update,
        "final_return": final,
        "wall_time_s": wall_time_s,
        "compile_time_s": 10.0,
    }
    return _write(Path(folder), {**config, "checkpoint_every": 0}, rows, summary)


def write_sweep(
    folder: Path,
    grid: dict[str, list[Any]] | None = None,
    algo: str = "ppo",
    env: str = "CartPole-v1",
    seeds: int = 3,
    updates: int = 8,
    steps_per_update: int = 256,
    run_times: list[float] | None = None,
    kl_bases: list[float] | None = None,
) -> Path:
    """A `kl-rl sweep` folder; point p ran in its own program for run_times[p] seconds."""
    grid = grid or {"kl_coef": [0.01, 0.1, 1.0]}
    names = list(grid)
    points = [dict(zip(names, combo, strict=True)) for combo in itertools.product(*grid.values())]
    run_times = run_times or [2.0 + p for p in range(len(points))]
    kl_bases = kl_bases or [0.01 * (p + 1) for p in range(len(points))]
    rows = []
    for p, point in enumerate(points):
        for seed in range(seeds):
            for u in range(1, updates + 1):
                row: dict[str, Any] = {"point": p, **point, "seed": seed, "update": u}
                metrics = _metrics(u, seed, p, steps_per_update, kl_bases[p], 0.0)
                row.update({k + ("_metric" if k in point else ""): metrics[k] for k in sorted(metrics)})
                row["eval_return"] = episode_return(u, seed, p) + 1 if u == updates else ""
                rows.append(row)
    config = {"algo": algo, "env": env, "seeds": seeds, "lr": 1e-3, "total_steps": updates * steps_per_update}
    summary = {
        "algo": algo,
        "env": env,
        "seeds": list(range(seeds)),
        "grid": grid,
        "num_points": len(points),
        "programs": [{"points": [p], "compile_time_s": 5.0, "run_time_s": t} for p, t in enumerate(run_times)],
    }
    return _write(Path(folder), config, rows, summary)


def write_tune(folder: Path) -> Path:
    """A `kl-rl tune` folder: one row per trial."""
    rows = [
        {"number": 0, "state": "COMPLETE", "lr": 1e-3, "value": 100.0, "final_return_mean": 100.0},
        {"number": 1, "state": "PRUNED", "lr": 1e-2, "value": "", "final_return_mean": ""},
    ]
    config = {"algo": "ppo", "env": "CartPole-v1", "seeds": [0], "space": {"lr": "log:1e-4:1e-2"}}
    return _write(Path(folder), config, rows, {"algo": "ppo", "env": "CartPole-v1"})
