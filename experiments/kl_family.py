"""The KL-leash family side by side: final return, speed to a threshold, KL per update, wall time.

    python experiments/kl_family.py                       # frontier and speed, 16 seeds (hours on 2 cores)
    python experiments/kl_family.py --quick               # every code path, 2 seeds, a few updates
    python experiments/kl_family.py frontier --envs Pendulum-v1 --algos ppo mdpo
    python experiments/kl_family.py --table               # the markdown tables of the full results

Every algorithm of `ALGORITHMS` that is registered in `kl_rl.agents` runs on the same envs at the
same env-step budget (`BUDGETS`), from its preset for the env (budget overridden), with its leash
swept over three strengths:

- frontier: per (env, algorithm, leash value), 16 seeds: the final policy's evaluation return
  (IQM with a percentile-bootstrap 95% CI, median, every seed), the env steps until the training
  return first reaches the env's threshold (censored at 2 x budget), the mean per-update KL
  (the algorithm's `kl_metric`, averaged over all updates of a seed) and the sweep's compile and
  run time. A leash sweep is one `kl_rl.sweep.run_sweep`: the leash fields are traced, so the
  three strengths share one compiled program (the summary records `compiled_programs`).
- speed: env steps/s of each on-policy agent against PPO's, all at one rollout shape (4 envs x
  128 steps on CartPole-v1, each algorithm's dataclass defaults otherwise), compiled once each
  and timed in turns in this one process (order rotated every round), as per-round ratios to PPO.
  The off-policy agents (MPO, AWR) are timed in the same turns at their own dataclass defaults
  (their rollout shape included: their cost is their gradient steps), for a few updates, and
  report gradient steps/s beside env steps/s.

Add an algorithm by adding an `Entry`; an entry whose algo is not registered (or whose leash field
its config lacks) is skipped with one line, so entries for agents in progress can wait here.

Outputs: the sweeps are saved under runs/kl_family_<budget>/ (git-ignored; at the full budget a
sweep already there is read back instead of rerun), beside results.json, results.csv (one row per
env, algorithm and leash value) and results.md. The full budget also writes
experiments/results/kl-family.json and kl-family.md, which notebooks/06_kl_policy_iteration.ipynb
draws.
"""

import argparse
import csv
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import pandas as pd

from kl_rl import analysis, envs, parallel, pipeline, resolve, stats, sweep
from kl_rl import config as config_lib
from kl_rl.agents import ALGOS
from kl_rl.train import make_trainer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


class Entry(NamedTuple):
    """One algorithm of the study: a registered algo, its leash and what else it fixes."""

    algo: str
    """The `kl_rl.agents` registry name."""
    leash: str
    """The config field that sets the leash's strength (a traced field, so one program per sweep)."""
    values: tuple[float, ...]
    """Three strengths, tightest first."""
    overrides: tuple[tuple[str, Any], ...] = ()
    """(name, value) options fixed for every strength (PPO-SPO's surrogate)."""
    kl_metric: str = "kl"
    """The per-update KL the frontier plots (every agent here logs its KL(old || new) as `kl`)."""
    on_policy: bool = True
    """Whether the speed study times it against PPO at PPO's rollout shape."""
    grad_steps: bool = False
    """An off-policy agent whose config's `grad_steps` (gradient steps per update) the speed
    study reports per second, timed at its own defaults."""


ALGORITHMS: dict[str, Entry] = {
    # PPO: the ratio clip; a smaller clip_eps is a tighter leash.
    "ppo": Entry("ppo", "clip_eps", (0.1, 0.2, 0.4)),
    # SPO (Xie et al. 2025, arXiv 2401.16025): the penalty on |r - 1| scaled by clip_eps.
    "ppo-spo": Entry("ppo", "clip_eps", (0.1, 0.2, 0.4), (("surrogate", "spo"),)),
    # TRPO: the KL(old || new) constraint delta.
    "trpo": Entry("trpo", "max_kl", (0.003, 0.01, 0.03)),
    # MDPO (Tomar et al. 2022, arXiv 2005.09814): t_0, the KL penalty being 1 / t_k.
    "mdpo": Entry("mdpo", "step_size", (0.3, 1.0, 3.0)),
    # VPG has no KL term at its preset; its step size is its only leash.
    "vpg": Entry("vpg", "lr", (1e-3, 3e-3, 1e-2)),
    # CEM: the trust region on KL(old || new) between search Gaussians over parameters (its
    # `kl` is in parameter space, not the policy's action space).
    "cem": Entry("cem", "trust_kl", (0.05, 0.5, 5.0), on_policy=False),
    # The KL-regularized policy iteration family (issue 25): run once registered.
    # V-MPO: the M-step bound on KL(pi_old || pi) of a categorical policy (a Gaussian's is
    # eps_alpha_mu, which this entry does not sweep).
    "vmpo": Entry("vmpo", "eps_alpha", (0.002, 0.01, 0.05)),
    # MPO: the M-step bound on KL(pi' || pi) (its mean part, for a Gaussian).
    "mpo": Entry("mpo", "epsilon_mean", (0.001, 0.01, 0.1), on_policy=False, grad_steps=True),
    "awr": Entry("awr", "beta", (3.0, 1.0, 0.3), on_policy=False, grad_steps=True),
}

ENVS = {
    # env: (env steps per seed at the full budget, the training return counted as reaching it)
    "CartPole-v1": (100_000, 475.0),
    "Pendulum-v1": (200_000, -250.0),
    "Acrobot-v1": (200_000, -100.0),
}

BUDGETS = {
    # A test of every code path: 2 seeds, a few updates on CartPole-v1.
    "quick": {"seeds": 2, "envs": ("CartPole-v1",), "steps": 2_048, "speed_steps": 1_024, "speed_seeds": 1,
              "speed_rounds": 1, "speed_updates": 1},
    # The published numbers: 16 seeds at each env's budget (ENVS).
    "full": {"seeds": 16, "envs": ("CartPole-v1", "Pendulum-v1"), "steps": None, "speed_steps": 51_200,
             "speed_seeds": 4, "speed_rounds": 5, "speed_updates": 20},
}  # fmt: skip
SPEED_ROLLOUT = {"num_envs": 4, "num_steps": 128}
"""The rollout shape every agent of the speed study shares (PureJaxRL's CartPole default)."""


def runs_dir(budget: str) -> Path:
    return ROOT / "runs" / f"kl_family_{budget}"


def available(names: list[str] | None = None, log=print) -> dict[str, Entry]:
    """The entries of ALGORITHMS (or of `names`) whose algo is registered and has the leash field."""
    out = {}
    for name in names or ALGORITHMS:
        entry = ALGORITHMS[name]
        if entry.algo not in ALGOS:
            log(f"skip {name}: algo {entry.algo!r} is not registered in kl_rl.agents")
            continue
        if entry.leash not in {f.name for f in dataclasses.fields(ALGOS[entry.algo].config)}:
            log(f"skip {name}: {ALGOS[entry.algo].config.__name__} has no field {entry.leash!r}")
            continue
        out[name] = entry
    return out


def budget_overrides(algo: str, env: str, steps: int, base: dict) -> dict:
    """What sets `algo`'s budget on `env` to about `steps` env steps: total_steps, or for an
    algorithm counted in iterations (CEM) as many whole iterations as fit (at least one)."""
    config = resolve.resolve_config(algo, env, None, base)
    if not hasattr(config, "iterations"):
        return {"total_steps": steps}
    per_iteration = make_trainer(algo, config.replace(iterations=1), envs.make(env)).steps_per_update
    return {"iterations": max(1, steps // per_iteration)}


def ci(values) -> dict:
    """IQM, its percentile-bootstrap 95% CI and the median of per-seed values, and every value.

    A non-finite value (a diverged seed) leaves the IQM's CI undefined (NaN)."""
    values = np.asarray(values, np.float64)
    finite = bool(np.all(np.isfinite(values)))
    lo, hi = stats.bootstrap_iqm_ci(values) if finite else (float("nan"), float("nan"))
    return {"iqm": stats.iqm(values), "ci95": [lo, hi], "median": float(np.median(values)),
            "values": [float(v) for v in values]}  # fmt: skip


def steps_to_threshold(df: pd.DataFrame, threshold: float, budget_steps: int) -> pd.Series:
    """Per seed, the env steps at the first update whose training return reached `threshold`;
    a seed that never did gets 2 x budget (censored: slower than any seed that did)."""

    def first(rows):
        hit = rows[rows["episode_return"] >= threshold]
        return float(hit["env_steps"].min()) if len(hit) else 2.0 * budget_steps

    return df.sort_values("update").groupby("seed")[["episode_return", "env_steps"]].apply(first)


def summarize(df: pd.DataFrame, leash: str, kl_metric: str, threshold: float, budget_steps: int) -> list[dict]:
    """One row per leash value of a sweep's tidy table (`analysis.load`): return, steps, KL."""
    rows = []
    for value, part in df.groupby(leash):
        final = part.dropna(subset=["eval_return"]).groupby("seed")["eval_return"].first()
        final = final.reindex(sorted(part["seed"].unique()))  # a diverged seed: NaN
        steps = steps_to_threshold(part, threshold, budget_steps)
        rows.append({
            "value": float(value),
            "final_return": ci(final.to_numpy()),
            "steps_to_threshold": ci(steps.to_numpy()),
            "reached": int((steps <= budget_steps).sum()),
            "mean_kl": ci(part.groupby("seed")[kl_metric].mean().to_numpy()),
            "env_steps": int(part["env_steps"].max()),
        })  # fmt: skip
    return rows


def _sweep(budget: str, env: str, name: str, entry: Entry, steps: int, seeds: int, log=print,
           batching: str | None = None) -> Path:  # fmt: skip
    """The leash sweep of one algorithm on one env, saved under runs/kl_family_<budget>/<env>/<name>.

    At the full budget a sweep already there is read back; otherwise it is (re)run.
    """
    folder = runs_dir(budget) / env / name
    if budget == "full" and (folder / "summary.json").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    base = {**dict(entry.overrides), **budget_overrides(entry.algo, env, steps, dict(entry.overrides))}
    start = time.perf_counter()
    result = sweep.run_sweep(entry.algo, env, {entry.leash: list(entry.values)}, seeds, overrides=base, log=log,
                             batching=batching)  # fmt: skip
    config = config_lib.to_dict(resolve.resolve_config(entry.algo, env, None, base))
    result.save(folder, {"algo": entry.algo, "env": env, "seeds": seeds, **config})
    log(f"{env} {name}: {len(result.points)} x {seeds} seeds in {time.perf_counter() - start:.0f}s")
    return folder


def frontier(budget: str, envs_: tuple[str, ...] | None = None, algos: list[str] | None = None, log=print,
             seeds: int | None = None, batching: str | None = None) -> dict:  # fmt: skip
    """The frontier study: {"rows": one per (env, algorithm, leash value)}; `seeds` and
    `batching` override the budget's seed count and the CPU default (map) for the off-policy
    agents' many small gradient steps, which vmap runs faster (every row records its seeds)."""
    b = BUDGETS[budget]
    rows = []
    for env in envs_ or b["envs"]:
        env_steps, threshold = ENVS[env]
        steps = b["steps"] or env_steps
        for name, entry in available(algos, log).items():
            folder = _sweep(budget, env, name, entry, steps, seeds or b["seeds"], log, batching)
            summary = json.loads((folder / "summary.json").read_text())
            df = analysis.load(folder)
            per_value = summarize(df, entry.leash, entry.kl_metric, threshold, steps)
            program = summary["programs"]
            run_s = sum(p["run_time_s"] for p in program)
            for row in per_value:
                diverged = [d for d in summary["diverged"] if entry.values[d["point"]] == row["value"]]
                rows.append({"env": env, "algo": name, "leash": entry.leash, **row, "threshold": threshold,
                             "budget": steps, "seeds": len(summary["seeds"]),
                             "compiled_programs": summary["compiled_programs"],
                             "compile_s": sum(p["compile_time_s"] for p in program), "sweep_run_s": run_s,
                             "run_s_per_value": run_s / len(per_value),
                             "diverged": diverged})  # fmt: skip
    return {"rows": rows}


def _speed_program(algo: str, overrides: dict, steps: int | None, seeds: int, updates: int = 0):
    """A compiled run of `algo` on CartPole-v1 at its dataclass defaults (no preset): at
    SPEED_ROLLOUT for `steps` env steps, or with steps None at its own rollout shape for
    `updates` updates. Returns (run, compile_s, env steps, gradient steps or None)."""
    env = envs.make("CartPole-v1")
    if steps is None:
        defaults = ALGOS[algo].config()
        fields = {**overrides, "total_steps": updates * defaults.num_envs * defaults.num_steps}
    else:
        fields = {**SPEED_ROLLOUT, **overrides, "total_steps": steps}
    config = config_lib.build(ALGOS[algo].config, fields)
    resolve.check_config(algo, "CartPole-v1", env, config)
    trainer = make_trainer(algo, config, env)
    lay = parallel.layout(seeds)
    programs = parallel.Programs(trainer, lay)
    keys = jax.vmap(jax.random.key)(np.arange(seeds))

    def run():
        return pipeline.execute(pipeline.Group(trainer, lay, programs), keys, [config] * seeds)

    run()
    grad_steps = seeds * config.num_updates * config.grad_steps if steps is None else None
    return run, programs.compile_time_s, seeds * config.num_updates * config.num_envs * config.num_steps, grad_steps


def speed(budget: str, algos: list[str] | None = None, log=print) -> dict:
    """Env steps/s of each on-policy agent and its per-round ratio to PPO's, timed in turns; the
    off-policy agents' env and gradient steps/s at their own defaults, in the same turns."""
    b = BUDGETS[budget]
    entries = {n: e for n, e in available(algos, log).items() if e.on_policy or e.grad_steps}
    entries = {"ppo": ALGORITHMS["ppo"], **entries}
    programs = {name: _speed_program(e.algo, dict(e.overrides), None if e.grad_steps else b["speed_steps"],
                                     b["speed_seeds"], b["speed_updates"])
                for name, e in entries.items()}  # fmt: skip
    rates: dict[str, list[float]] = {name: [] for name in programs}
    grad_rates: dict[str, list[float]] = {name: [] for name, p in programs.items() if p[3] is not None}
    names = list(programs)
    for r in range(b["speed_rounds"]):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order if r % 2 == 0 else order[::-1]:
            run, _, steps, grad_steps = programs[name]
            start = time.perf_counter()
            out = run()
            jax.block_until_ready(out.eval_returns)
            seconds = time.perf_counter() - start
            rates[name].append(steps / seconds)
            if grad_steps is not None:
                grad_rates[name].append(grad_steps / seconds)
        log(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:,.0f}" for n, v in rates.items()))
    ppo = np.asarray(rates["ppo"])
    return {"env": "CartPole-v1", "rollout": SPEED_ROLLOUT, "total_steps": b["speed_steps"],
            "seeds": b["speed_seeds"], "rounds": b["speed_rounds"], "env_steps_per_s": rates,
            "grad_steps_per_s": grad_rates, "off_policy_updates": b["speed_updates"],
            "off_policy_env_steps": {n: programs[n][2] // b["speed_seeds"] for n in grad_rates},
            "compile_s": {n: p[1] for n, p in programs.items()},
            "ratio_to_ppo": {n: ci(np.asarray(v) / ppo) if len(v) > 1 else {"median": float(v[0] / ppo[0])}
                             for n, v in rates.items()}}  # fmt: skip


def _ratio(x: float) -> str:
    """A ratio to PPO: two decimals, or two significant digits below 0.1 (MPO's 0.0014)."""
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def _fmt(stat: dict, spec: str) -> str:
    lo, hi = stat["ci95"]
    return f"{stat['iqm']:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def frontier_csv(rows: list[dict], path: Path) -> None:
    """One line per (env, algorithm, leash value), with every seed's final return."""
    fields = ["env", "algo", "leash", "value", "seeds", "final_return_iqm", "final_return_lo", "final_return_hi",
              "final_return_median", "mean_kl_iqm", "mean_kl_median", "steps_to_threshold_median", "reached",
              "threshold", "budget", "compile_s", "run_s_per_value", "final_return_per_seed"]  # fmt: skip
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for r in rows:
            fr = r["final_return"]
            writer.writerow({
                **{k: r[k] for k in ("env", "algo", "leash", "value", "seeds", "reached", "threshold", "budget",
                                     "compile_s", "run_s_per_value")},
                "final_return_iqm": fr["iqm"], "final_return_lo": fr["ci95"][0], "final_return_hi": fr["ci95"][1],
                "final_return_median": fr["median"], "mean_kl_iqm": r["mean_kl"]["iqm"],
                "mean_kl_median": r["mean_kl"]["median"],
                "steps_to_threshold_median": r["steps_to_threshold"]["median"],
                "final_return_per_seed": " ".join(f"{v:.1f}" for v in fr["values"]),
            })  # fmt: skip


def tables(results: dict) -> str:
    """The markdown tables of a results dict (frontier rows, speed)."""
    out = []
    rows = results.get("frontier", {}).get("rows", [])
    if rows:
        out += ["| env | algo | leash | final return IQM [95% CI] | median | env steps to threshold (median) "
                "| reached | mean KL per update (median) | run s per value (compile s) |",
                "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            out.append(f"| {r['env']} | {r['algo']} | {r['leash']}={r['value']:g} | {_fmt(r['final_return'], '.1f')} "
                       f"| {r['final_return']['median']:.1f} | {r['steps_to_threshold']['median']:,.0f} "
                       f"(threshold {r['threshold']:g}) | {r['reached']}/{r['seeds']} | "
                       f"{r['mean_kl']['median']:.2g} | {r['run_s_per_value']:.0f} "
                       f"({r['compile_s']:.0f}) |")  # fmt: skip
        out += [
            "",
            "Every seed's final return:",
            "",
            "| env | algo | leash | final return per seed |",
            "|---|---|---|---|",
        ]
        for r in rows:
            seeds = ", ".join(f"{v:.1f}" for v in r["final_return"]["values"])
            out.append(f"| {r['env']} | {r['algo']} | {r['leash']}={r['value']:g} | {seeds} |")
        out.append("")
    sp = results.get("speed")
    if sp:
        out += [f"Speed, CartPole-v1, {sp['rollout']['num_envs']} envs x {sp['rollout']['num_steps']} steps, "
                f"{sp['total_steps']:,} env steps x {sp['seeds']} seeds, {sp['rounds']} rounds in turns:", "",
                "| algo | env steps/s (median of rounds) | ratio to PPO (median of per-round ratios) "
                "| gradient steps/s (median of rounds) | compile s |",
                "|---|---|---|---|---|"]  # fmt: skip
        grad_rates = sp.get("grad_steps_per_s", {})
        for name, rates in sp["env_steps_per_s"].items():
            ratio = sp["ratio_to_ppo"][name]
            band = f" [{_ratio(ratio['ci95'][0])}, {_ratio(ratio['ci95'][1])}]" if "ci95" in ratio else ""
            grads = f"{np.median(grad_rates[name]):,.0f}" if name in grad_rates else "-"
            out.append(f"| {name} | {np.median(rates):,.0f} | {_ratio(ratio['median'])}{band} | {grads} "
                       f"| {sp['compile_s'][name]:.0f} |")  # fmt: skip
        if grad_rates:
            out += ["", f"The off-policy agents ({', '.join(grad_rates)}) ran {sp['off_policy_updates']} updates "
                        "each at their own defaults (rollout shape included), not PPO's."]  # fmt: skip
    return "\n".join(out)


def write(results: dict, folder: Path) -> None:
    """results.json, results.csv and results.md in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    frontier_csv(results.get("frontier", {}).get("rows", []), folder / "results.csv")
    (folder / "results.md").write_text(tables(results) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="*", metavar="STUDY", help="frontier and/or speed (default: both)")
    parser.add_argument("--quick", action="store_true", help="the quick budget: 2 seeds, a few updates")
    parser.add_argument("--envs", nargs="+", choices=tuple(ENVS), help="the envs of the frontier study")
    parser.add_argument("--algos", nargs="+", choices=tuple(ALGORITHMS), help="entries of ALGORITHMS")
    parser.add_argument("--table", action="store_true", help="print the tables of the full budget's results")
    parser.add_argument("--seeds", type=int, help="seeds per leash value (default: the budget's, 16 at full)")
    parser.add_argument("--batching", choices=("map", "vmap"), help="how a device runs its seeds (default: map on CPU)")
    args = parser.parse_args(argv)
    if args.table:
        print(tables(json.loads((RESULTS / "kl-family.json").read_text())))
        return 0
    unknown = [s for s in args.studies if s not in ("frontier", "speed")]
    if unknown:
        parser.error(f"unknown study {unknown[0]!r}; use frontier or speed")
    budget = "quick" if args.quick else "full"
    parallel.use_cpu_devices()
    folder = runs_dir(budget)
    # The full budget adds to the results there are: this folder's, else the committed ones (a
    # fresh checkout has no runs/), so a study rerun alone keeps the other's rows.
    results = {}
    if budget == "full":
        for saved in (folder / "results.json", RESULTS / "kl-family.json"):
            if saved.exists():
                results = json.loads(saved.read_text())
                break
    for study in args.studies or ("frontier", "speed"):
        start = time.perf_counter()
        if study == "frontier":
            new = frontier(budget, tuple(args.envs) if args.envs else None, args.algos, seeds=args.seeds,
                           batching=args.batching)  # fmt: skip
            # Rows of envs and algorithms not rerun now are kept.
            done = {(r["env"], r["algo"]) for r in new["rows"]}
            kept = [r for r in results.get("frontier", {}).get("rows", []) if (r["env"], r["algo"]) not in done]
            results["frontier"] = {"rows": kept + new["rows"], "budget": budget}
        else:
            results["speed"] = speed(budget, args.algos)
        results.setdefault("wall_s", {})[study] = time.perf_counter() - start
        write(results, folder)
        if budget == "full":
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / "kl-family.json").write_text(json.dumps(results, indent=1) + "\n")
            (RESULTS / "kl-family.md").write_text(tables(results) + "\n")
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
