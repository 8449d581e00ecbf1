"""RLHF in miniature: SFT, then GRPO, PPO with token KL, RLOO and online DPO on Addition-v0.

    python experiments/rlhf.py --budget full              # every study (about 40 min on 2 cores)
    python experiments/rlhf.py learn --budget full        # one study
    python experiments/rlhf.py --table                    # docs/benchmarks.md's tables

- learn: the reference is `kl-rl train --algo sft --env Addition-v0` at its preset (seed 0).
  Each RL algorithm then runs at its preset from that reference (`--reference`), its seeds in
  one process, timed as `kl-rl train` times it (wall, compile). final_return is the held-out greedy
  accuracy (512 problems).
- leash: GRPO at three betas (k3 in the loss): kl_ref at the end falls as beta rises.

GRPO's learn runs 8 seeds (its target is a median over 8); PPO-LM, RLOO and online DPO run 4
at the same budget per seed. The studies after `learn` run 32 updates (8,192 responses) per
seed, 8% of the presets' budget; leash with 8 seeds, frontier, estimators and direction with 4.
All of it takes about 40 minutes on 2 cores.
- frontier: the reward-KL frontier of GRPO, PPO-LM, RLOO and online DPO over beta (final
  held-out accuracy against final kl_ref), IQMs with bootstrap CIs.
- estimators: GRPO with k1, k3 and exact in the loss, and k1, k3 and exact in the reward.
- direction: what the forward-KL gradient of k3-in-loss does to the answer distribution
  against the reverse-KL gradient (exact in the loss): per-token entropy, the probability of
  the greedy answer, and pass@k of the final policies on the held-out problems.

Every run is saved under runs/rlhf_<budget>/ (git-ignored); at the full budget a folder already
there is read back instead of rerun. Summaries go to experiments/results/rlhf-<study>.json
(full budget), which docs/benchmarks.md reports and notebooks/05_rlhf_in_miniature.ipynb draws.
"""

import argparse
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

import kl_rl
from kl_rl import analysis, envs, parallel, resolve, rollout, runfolder, stats, sweep
from kl_rl import config as config_lib
from kl_rl.envs.tasks import HeldOutVecEnv, pass_at_k

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
ENV = "Addition-v0"
ALGOS = ("grpo", "ppo-lm", "rloo", "dpo")
STUDIES = ("learn", "leash", "frontier", "estimators", "direction")

BUDGETS = {
    # CI: every code path at a few updates of a tiny batch.
    "small": {"seeds": 2, "study_seeds": 2, "learn_seeds": {},
              "sft_steps": 2_048, "steps": 128, "num_envs": 32, "eval_episodes": 64,
              "leash_betas": (0.0, 1.0), "betas": (0.0, 1.0), "study_steps": 128, "algos": ("grpo",),
              "frontier_algos": ("grpo",), "net": {"layers": 1, "width": 32, "heads": 2},
              "estimators": ("k3",), "placements": ("loss",), "pass_k": (1, 2), "pass_n": 4},
    # The published numbers: 8 seeds at the presets (learn); the studies at a shorter budget.
    "full": {"seeds": 8, "study_seeds": 4, "learn_seeds": {"grpo": 8, "ppo-lm": 4, "rloo": 4, "dpo": 4},
             "sft_steps": None, "steps": None, "num_envs": None, "eval_episodes": None,
             "leash_betas": (0.01, 0.1, 1.0), "betas": (0.01, 0.1, 1.0), "study_steps": 8_192,
             "algos": ALGOS, "frontier_algos": ALGOS, "estimators": ("k1", "k3", "exact"),
             "placements": ("loss", "reward"), "net": {},
             "pass_k": (1, 4, 16), "pass_n": 16},
}  # fmt: skip


def runs_dir(budget: str) -> Path:
    return ROOT / "runs" / f"rlhf_{budget}"


def _overrides(budget: str, algo: str, steps_key: str = "steps") -> dict:
    """What the budget changes in an algo's preset (nothing at the full budget's learn study)."""
    b = BUDGETS[budget]
    out = dict(b["net"])
    if b[steps_key] is not None:
        out["total_steps"] = b[steps_key]
    if b["num_envs"] is not None:
        group = resolve.resolve_config(algo, ENV).group_size
        out.update(num_envs=max(b["num_envs"], 2 * group), eval_episodes=b["eval_episodes"], eval_every=0)
    return out


def _fresh(folder: Path) -> Path:
    """`folder`, emptied: a run rerun at the small budget must not keep an older run's checkpoints."""
    shutil.rmtree(folder, ignore_errors=True)
    return folder


_MADE: set[str] = set()
"""The budgets whose reference this process has trained (the small one is retrained once per process)."""


def reference(budget: str, log=print) -> Path:
    """The SFT run every RL run starts from and is held near (seed 0, its preset)."""
    folder = runs_dir(budget) / "sft"
    if budget not in _MADE and not (budget == "full" and (folder / "summary.json").exists()):
        _MADE.add(budget)
        b = BUDGETS[budget]
        overrides = dict(b["net"])
        if b["sft_steps"] is not None:
            overrides.update(total_steps=b["sft_steps"], eval_episodes=b["eval_episodes"])
        result = kl_rl.run("sft", ENV, seeds=1, **overrides)
        result.save(_fresh(folder))
        log(f"sft: held-out greedy accuracy {result.final_returns[0]:.3f}, wall {result.wall_time_s:.1f}s")
    return folder


def _sweep(budget: str, name: str, algo: str, grid: dict, overrides: dict, log=print,
           seeds_key: str = "study_seeds") -> pd.DataFrame:  # fmt: skip
    """One sweep from the reference, saved as runs/rlhf_<budget>/<name>, read back as a tidy table."""
    folder = runs_dir(budget) / name
    if not (budget == "full" and (folder / "summary.json").exists()):
        start = time.perf_counter()
        seeds = BUDGETS[budget][seeds_key]
        result = sweep.run_sweep(algo, ENV, grid, seeds, overrides=overrides, log=log, reference=reference(budget, log))
        base = config_lib.to_dict(resolve.resolve_config(algo, ENV, None, overrides))
        result.save(_fresh(folder), {"algo": algo, "env": ENV, "seeds": seeds, **base})
        log(f"{name}: {len(result.points)} point(s) x {seeds} seeds in {time.perf_counter() - start:.0f}s")
    return analysis.load(folder)


def ci(values) -> dict:
    """IQM and median of per-seed values, with the IQM's percentile-bootstrap 95% CI."""
    values = np.asarray(values, np.float64)
    lo, hi = stats.bootstrap_iqm_ci(values) if np.all(np.isfinite(values)) else (float("nan"), float("nan"))
    return {"iqm": stats.iqm(values), "ci95": [lo, hi], "median": float(np.median(values)),
            "values": [float(v) for v in values]}  # fmt: skip


def final(df: pd.DataFrame, metric: str) -> pd.Series:
    """Per seed, `metric` at the last update (eval_return: the final held-out accuracy)."""
    last = df[df["update"] == df["update"].max()]
    return last.groupby("seed")[metric].first()


def learn(budget: str, log=print) -> dict:
    """Each algo at its preset from the SFT reference: held-out accuracy, wall and compile time."""
    ref = reference(budget, log)
    out = {"reference": json.loads((ref / "summary.json").read_text())["final_return"][0], "algos": {}}
    for algo in BUDGETS[budget]["algos"]:
        folder = runs_dir(budget) / f"learn-{algo}"
        if not (budget == "full" and (folder / "summary.json").exists()):
            result = kl_rl.run(
                algo, ENV, seeds=BUDGETS[budget]["learn_seeds"].get(algo, BUDGETS[budget]["seeds"]), reference=str(ref),
                **_overrides(budget, algo),
            )
            result.save(_fresh(folder))
        summary = json.loads((folder / "summary.json").read_text())
        df = analysis.load(folder)
        points = df.dropna(subset=["eval_return"])
        curve = points.groupby("update")["eval_return"].median()
        out["algos"][algo] = {
            "final_return": ci(summary["final_return"]),
            "kl_ref": ci(final(df, "kl_ref")),
            "wall_s": summary["wall_time_s"],
            "compile_s": summary.get("compile_time_s"),
            "total_s": summary["wall_time_s"] + (summary.get("compile_time_s") or 0.0),
            "responses": int(resolve.resolve_config(algo, ENV, None, _overrides(budget, algo)).total_steps),
            "median_curve": {int(k): float(v) for k, v in curve.items()},
        }
        a = out["algos"][algo]
        log(f"{algo}: median accuracy {a['final_return']['median']:.3f}, {a['total_s']:.0f}s with compile")
    return out


def _frontier(df: pd.DataFrame, key: str) -> list[dict]:
    rows = []
    for value, part in df.groupby(key):
        rows.append(
            {key: float(value), "accuracy": ci(final(part, "eval_return")), "kl_ref": ci(final(part, "kl_ref"))}
        )
    return rows


def leash(budget: str, log=print) -> dict:
    """GRPO's final kl_ref and accuracy at three betas (k3 in the loss)."""
    betas = list(BUDGETS[budget]["leash_betas"])
    overrides = _overrides(budget, "grpo", "study_steps")
    df = _sweep(budget, "leash", "grpo", {"ref_kl_coef": betas}, overrides, log, seeds_key="seeds")
    rows = _frontier(df, "ref_kl_coef")
    medians = [r["kl_ref"]["median"] for r in rows]
    return {"rows": rows, "kl_ref_falls": bool(all(a > b for a, b in itertools.pairwise(medians)))}


def frontier(budget: str, log=print) -> dict:
    """Accuracy against kl_ref over beta, for each algo at its own placement of the KL."""
    out = {}
    for algo in BUDGETS[budget]["frontier_algos"]:
        if algo == "grpo" and BUDGETS[budget]["betas"] == BUDGETS[budget]["leash_betas"]:
            out[algo] = leash(budget, log)["rows"]  # the same sweep
            continue
        df = _sweep(budget, f"frontier-{algo}", algo, {"ref_kl_coef": list(BUDGETS[budget]["betas"])},
                    _overrides(budget, algo, "study_steps"), log)  # fmt: skip
        out[algo] = _frontier(df, "ref_kl_coef")
    return {"frontier": out}


def estimators(budget: str, log=print) -> dict:
    """GRPO at beta 0.1 with each estimator in the loss and in the reward."""
    b = BUDGETS[budget]
    grid = {"ref_kl_estimator": list(b["estimators"]), "ref_kl_in": list(b["placements"])}
    df = _sweep(
        budget, "estimators", "grpo", grid, {**_overrides(budget, "grpo", "study_steps"), "ref_kl_coef": 0.1}, log
    )
    rows = []
    for (est, where), part in df.groupby(["ref_kl_estimator", "ref_kl_in"]):
        rows.append({"estimator": est, "placement": where, "accuracy": ci(final(part, "eval_return")),
                     "kl_ref": ci(final(part, "kl_ref")), "entropy": ci(final(part, "entropy"))})  # fmt: skip
    return {"beta": 0.1, "estimators": rows}


def answer_stats(run_dir: Path, budget: str, seeds: list[int]) -> dict:
    """Per seed of a run: greedy accuracy, pass@k from n samples per held-out problem, the mean
    probability the policy gives its greedy answer, and the per-token entropy along it."""
    b = BUDGETS[budget]
    loaded = runfolder.load(run_dir)
    agent = loaded._agent()
    env = envs.make(ENV)
    problems, n = loaded.config.eval_episodes, b["pass_n"]
    sampler = HeldOutVecEnv(env, problems * n, repeat=n)
    greedy_env = HeldOutVecEnv(env, problems)

    @jax.jit
    def measure(state, key):
        def sample(k, obs):
            return agent.policy(state, obs).sample(k)

        def greedy(k, obs):
            return agent.policy(state, obs).mode()

        hits = rollout.evaluate(key, sample, sampler, None, False, env.response_length)
        greedy_hits = rollout.evaluate(key, greedy, greedy_env, None, False, env.response_length)

        # Along the greedy answer: its probability (product over tokens) and the entropy per token.
        def step(carry, k):
            vstate, log_p, ent, count, running = carry
            dist = agent.policy(state, vstate.obs)
            action = dist.mode()
            log_p = log_p + jnp.where(running, dist.log_prob(action), 0.0)
            ent = ent + jnp.where(running, dist.entropy(), 0.0)
            count = count + running
            vstate, out = greedy_env.step(k, vstate, action)
            return (vstate, log_p, ent, count, running & ~(out.terminated | out.truncated)), None

        zeros = jnp.zeros(problems)
        init = (greedy_env.reset(key), zeros, zeros, zeros, jnp.ones(problems, bool))
        (_, log_p, ent, count, _), _ = jax.lax.scan(step, init, jax.random.split(key, env.response_length))
        return hits, jnp.mean(greedy_hits), jnp.mean(jnp.exp(log_p)), jnp.mean(ent / jnp.maximum(count, 1))

    out = {"pass_at": {str(k): [] for k in b["pass_k"]}, "greedy": [], "p_greedy": [], "entropy": []}
    for seed in seeds:
        hits, greedy_acc, p_greedy, entropy = measure(loaded.seed_state(seed).agent, jax.random.key(seed))
        correct = np.asarray(hits).reshape(problems, n).sum(axis=1)
        for k in b["pass_k"]:
            out["pass_at"][str(k)].append(float(np.mean(pass_at_k(n, correct, k))))
        out["greedy"].append(float(greedy_acc))
        out["p_greedy"].append(float(p_greedy))
        out["entropy"].append(float(entropy))
    return out


def direction(budget: str, log=print) -> dict:
    """k3 in the loss (its gradient is the forward KL's) against exact in the loss (reverse)."""
    b = BUDGETS[budget]
    ref = reference(budget, log)
    out = {"beta": 1.0, "reference": answer_stats(ref, budget, [0]), "variants": {}}
    for est in ("k3", "exact"):
        folder = runs_dir(budget) / f"direction-{est}"
        if not (budget == "full" and (folder / "summary.json").exists()):
            overrides = {**_overrides(budget, "grpo", "study_steps"), "ref_kl_coef": 1.0, "ref_kl_estimator": est}
            kl_rl.run("grpo", ENV, seeds=b["study_seeds"], reference=str(ref), **overrides).save(_fresh(folder))
        out["variants"][est] = answer_stats(folder, budget, list(range(b["study_seeds"])))
        log(f"direction {est}: pass@k {out['variants'][est]['pass_at']}")
    return out


def _iqm_ci(stat: dict, spec: str = ".3f") -> str:
    lo, hi = stat["ci95"]
    return f"{stat['iqm']:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def tables(folder: Path = RESULTS) -> str:
    """docs/benchmarks.md's RLHF tables, from the full-budget results."""
    out = []

    def load(study):
        path = folder / f"rlhf-{study}.json"
        return json.loads(path.read_text()) if path.exists() else None

    if r := load("learn"):
        out += [f"SFT reference (seed 0): held-out greedy accuracy {r['reference']:.3f}", "",
                "| algo | responses per seed | seeds | median accuracy | IQM [95% CI] | min .. max |"
                " final kl_ref (median) | wall + compile, all seeds |", "|---" * 8 + "|"]  # fmt: skip
        for algo, a in r["algos"].items():
            f = a["final_return"]
            out.append(f"| {algo} | {a['responses']:,} | {len(f['values'])} | **{f['median']:.3f}** | {_iqm_ci(f)} | "
                       f"{min(f['values']):.3f} .. {max(f['values']):.3f} | {a['kl_ref']['median']:.2f} | "
                       f"{a['wall_s']:.0f} + {a['compile_s']:.0f} s |")  # fmt: skip
    if r := load("leash"):
        out += ["", "| GRPO beta (k3 in the loss) | final kl_ref: median, IQM [95% CI] | accuracy: median |",
                "|---|---|---|"]  # fmt: skip
        for row in r["rows"]:
            k = row["kl_ref"]
            acc = row["accuracy"]["median"]
            out.append(f"| {row['ref_kl_coef']:g} | {k['median']:.3f}, {_iqm_ci(k)} | {acc:.3f} |")
    if r := load("frontier"):
        out += ["", "| algo | beta | accuracy IQM [95% CI] | kl_ref IQM [95% CI] |", "|---|---|---|---|"]
        for algo, rows in r["frontier"].items():
            for row in rows:
                cells = f"{_iqm_ci(row['accuracy'])} | {_iqm_ci(row['kl_ref'])}"
                out.append(f"| {algo} | {row['ref_kl_coef']:g} | {cells} |")
    if r := load("estimators"):
        out += ["", f"| GRPO, beta {r['beta']:g}: estimator | placement | accuracy IQM [95% CI] | kl_ref IQM [95% CI] |"
                " entropy (median) |", "|---|---|---|---|---|"]  # fmt: skip
        for row in r["estimators"]:
            out.append(f"| {row['estimator']} | {row['placement']} | {_iqm_ci(row['accuracy'])} | "
                       f"{_iqm_ci(row['kl_ref'])} | {row['entropy']['median']:.3f} |")  # fmt: skip
    if r := load("direction"):
        ks = list(r["reference"]["pass_at"])
        out += ["", "| GRPO, beta 1 | greedy accuracy | " + " | ".join(f"pass@{k}" for k in ks)
                + " | P(greedy answer) | entropy per token |", "|---" * (4 + len(ks)) + "|"]  # fmt: skip
        named = [("reference (SFT)", r["reference"]), *[(f"{k} in the loss", x) for k, x in r["variants"].items()]]
        for name, v in named:
            cells = [np.median(v["greedy"])] + [np.median(v["pass_at"][k]) for k in ks]
            cells += [np.median(v["p_greedy"]), np.median(v["entropy"])]
            out.append(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="*", metavar="STUDY", help=f"any of {', '.join(STUDIES)} (default: all)")
    parser.add_argument("--budget", choices=tuple(BUDGETS), default="full")
    parser.add_argument("--table", action="store_true", help="print docs/benchmarks.md's tables from the results")
    args = parser.parse_args()
    if args.table:
        print(tables())
        return 0
    unknown = [s for s in args.studies if s not in STUDIES]
    if unknown:
        parser.error(f"unknown study {unknown[0]!r}; use any of {', '.join(STUDIES)}")
    parallel.use_cpu_devices()
    for study in args.studies or STUDIES:
        start = time.perf_counter()
        result = {"study": study, "budget": args.budget, **globals()[study](args.budget)}
        result["wall_s"] = time.perf_counter() - start
        if args.budget == "full":
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / f"rlhf-{study}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(
            json.dumps({k: v for k, v in result.items() if k not in ("frontier", "estimators", "variants")}, indent=1)[
                :2000
            ]
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
