"""Wall time of TRPO on CartPole-v1 at 100k steps: kl_rl beside sb3-contrib, in one invocation.

    python experiments/trpo_walltime.py --rounds 3 --anchor-python /work/anchors/sb3venv/bin/python

Each round runs, one after another on the same machine:

- sb3-contrib's TRPO with rl-baselines3-zoo's CartPole settings (experiments/anchors/sb3_trpo.py,
  in its own virtualenv; setup in that file's docstring): its `learn` time and its whole
  process time;
- `kl-rl train --algo trpo --env CartPole-v1 --seeds 1 --no-progress` as a fresh process, twice:
  once with the persistent compilation cache off (a cold start: tracing and XLA compilation
  included) and once with a warm cache (the second run of the same command). For each, the whole
  process time and the compiled program's run time (summary.json's wall_time_s).

Medians over rounds are printed and written to experiments/results/trpo-walltime.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def kl_rl_run(out: Path, cache: str) -> dict:
    env = {**os.environ, "KL_RL_CACHE_DIR": cache}
    cmd = [sys.executable, "-m", "kl_rl.cli", "train", "--algo", "trpo", "--env", "CartPole-v1", "--seeds", "1"]
    total = timed([*cmd, "--no-progress", "--out", str(out)], env)
    summary = json.loads((out / "summary.json").read_text())
    return {
        "process_s": total,
        "run_s": summary["wall_time_s"],
        "compile_s": summary["compile_time_s"],
        "final_return": summary["final_return"][0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--anchor-python", required=True, help="python of the sb3-contrib virtualenv")
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {"sb3": [], "cold": [], "warm": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cache = str(tmp / "xla-cache")
        for r in range(args.rounds):
            anchor_json = tmp / f"sb3-{r}.json"
            script = str(ROOT / "experiments" / "anchors" / "sb3_trpo.py")
            cmd = [args.anchor_python, script, "--seed", str(r), "--json", str(anchor_json)]
            process = timed(cmd, dict(os.environ))
            anchor = json.loads(anchor_json.read_text())
            rows["sb3"].append(
                {"process_s": process, "run_s": anchor["learn_s"], "final_return": anchor["final_return"]}
            )
            rows["cold"].append(kl_rl_run(tmp / f"cold-{r}", "off"))
            if r == 0:  # fill the cache once; the warm runs are the second run of the command
                kl_rl_run(tmp / "fill", cache)
            rows["warm"].append(kl_rl_run(tmp / f"warm-{r}", cache))
            print(f"round {r}: " + json.dumps({k: v[-1] for k, v in rows.items()}), flush=True)
    medians = {
        name: {key: statistics.median(row[key] for row in rs) for key in rs[0]} for name, rs in rows.items()
    }
    sb3 = medians["sb3"]["process_s"]
    for name in ("cold", "warm"):
        medians[name]["speedup_process"] = sb3 / medians[name]["process_s"]
        medians[name]["speedup_run"] = medians["sb3"]["run_s"] / medians[name]["run_s"]
    record = {"rounds": args.rounds, "medians": medians, "runs": rows}
    out = ROOT / "experiments" / "results" / "trpo-walltime.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(medians, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
